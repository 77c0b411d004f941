"""Multi-host runs: one process per host, every process running the same jitted steps.

JAX is multi-controller: each process drives its own devices and all processes trace and run
the same programs in the same order, on global arrays whose blocks live on different hosts.
For jaxinfer that means:

- `initialize` runs `jax.distributed.initialize` before anything touches a device. Settings
  come from flags (`add_distributed_args`: `--coordinator host:port --num-processes N
  --process-id I`) or, when no flag is given, from `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; with neither, the run is single-process. On CPU the
  cross-process collectives go through gloo.
- `sharding.mesh.make_mesh` lays hosts over the outer mesh axes (dp, then pp), so tp
  collectives stay inside a host.
- Weights restore straight into their shardings (`checkpoints.load_params`): orbax reads only
  the blocks of a host's own devices, and a Hugging Face directory is sliced per device by
  `jax.make_array_from_callback`.
- Every process feeds the runner the same host inputs (same prompts, same scheduler decisions);
  the runner places only local blocks and returns tokens replicated, so every process reads
  them locally. One process (`is_coordinator`) owns user-facing output: the CLI prints there.
  The offline paths (generate, bench) need no hand-off because every process computes the same
  inputs from the same flags. The server runs its gRPC front and scheduler on process 0 only
  and sends each step's inputs to the others (`serve/multihost.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from jaxinfer.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Where the coordinator is and which process this is (all None: single process)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.coordinator, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise ConfigError("multi-host needs all of --coordinator, --num-processes and "
                              "--process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                              "JAX_PROCESS_ID)")
        if not any(given):
            return
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator must be host:port, got {self.coordinator!r}")
        if self.num_processes < 1:
            raise ConfigError(f"--num-processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"--process-id must be in [0, {self.num_processes}), "
                              f"got {self.process_id}")

    @property
    def is_distributed(self) -> bool:
        return self.coordinator is not None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def config_from(coordinator: str | None = None, num_processes: int | None = None,
                process_id: int | None = None) -> DistributedConfig:
    """Flags win; with no flag at all, the JAX_* environment variables are used."""
    if coordinator is None and num_processes is None and process_id is None:
        return DistributedConfig(coordinator=os.environ.get(ENV_COORDINATOR) or None,
                                 num_processes=_env_int(ENV_NUM_PROCESSES),
                                 process_id=_env_int(ENV_PROCESS_ID))
    return DistributedConfig(coordinator=coordinator, num_processes=num_processes,
                             process_id=process_id)


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags, shared by `jaxinfer.generate`, the bench and the server."""
    g = parser.add_argument_group("multi-host (one process per host; see sharding/multihost.py)")
    g.add_argument("--coordinator", default=None,
                   help=f"host:port of process 0's coordinator (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of processes (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's index, 0-based (env {ENV_PROCESS_ID})")


def initialize(cfg: DistributedConfig) -> bool:
    """Join the multi-process run described by `cfg`; False (nothing done) for one process.

    Must run before the first device access of the process."""
    if not cfg.is_distributed:
        return False
    import jax  # here: the flags above are read by processes that never touch a device

    try:  # gloo gives CPU processes real collectives; GPU runs ignore the setting
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # an older jax without the option
        logger.info("this jax has no jax_cpu_collectives_implementation option")
    logger.info("joining %d processes as %d via %s", cfg.num_processes, cfg.process_id,
                cfg.coordinator)
    jax.distributed.initialize(coordinator_address=cfg.coordinator,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)
    return True


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` from the flags of `add_distributed_args` (or the environment)."""
    return initialize(config_from(args.coordinator, args.num_processes, args.process_id))


def is_coordinator() -> bool:
    """Whether this process owns user-facing output (process 0)."""
    import jax

    return jax.process_index() == 0
