"""`--mesh dp=D,pp=P,tp=T` -> a `jax.sharding.Mesh` with axes ("dp", "pp", "tp"), and the checks
that a mesh fits the devices, the model and the engine.

Device order. `tp` is the innermost axis (an all-reduce per attention block and per MLP), `pp`
next (one activation hand-off per stage per micro-batch), `dp` outermost (no traffic at all in a
step). On one process the grid comes from `mesh_utils.create_device_mesh`, which knows the
physical topology where there is one. With several processes the grid is hybrid: processes
(hosts) are split over the outermost axes first, so a `tp` group never spans two hosts unless
`tp` is larger than a host; `mesh_utils.create_hybrid_device_mesh` then lays out each host's
devices.

Every check raises `ConfigError` with one line that names the numbers, because these are the
errors a user meets first (`--mesh tp=3` on a model with 8 heads).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from jaxinfer.errors import ConfigError

# JAX is imported inside the functions that build meshes: MeshSpec and parse_mesh serve the
# server's front process too, which never loads JAX (its engine cores do).

logger = logging.getLogger(__name__)

MESH_AXES = ("dp", "pp", "tp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSpec:
    dp: int = 1
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"mesh {name} must be a positive integer, got {value!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.pp, self.tp)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return ",".join(f"{n}={getattr(self, n)}" for n in MESH_AXES)

    @classmethod
    def of(cls, mesh: jax.sharding.Mesh) -> MeshSpec:
        """The spec of a built mesh (axes it lacks count as 1)."""
        return cls(**{n: int(mesh.shape[n]) for n in MESH_AXES if n in mesh.shape})


def parse_mesh(text: str) -> MeshSpec:
    """Parse "dp=2,tp=4" (missing axes are 1)."""
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"bad mesh item {part!r}: expected dp=N, pp=N or tp=N")
        if name in values:
            raise ConfigError(f"mesh axis {name!r} given twice in {text!r}")
        try:
            values[name] = int(value)
        except ValueError:
            raise ConfigError(f"mesh axis {name!r} needs an integer, got {value!r}") from None
    return MeshSpec(**values)


def parse_mesh_list(text: str) -> list[MeshSpec]:
    """Parse a sweep "tp=1;tp=2;pp=2;tp=2,pp=2" (`;` between meshes, `,` within one)."""
    specs = [parse_mesh(part) for part in text.split(";") if part.strip()]
    if not specs:
        raise ConfigError(f"no mesh in {text!r}: expected e.g. \"tp=1;tp=2;pp=2\"")
    return specs


def _hybrid_split(shape: Sequence[int], num_groups: int) -> tuple[int, ...] | None:
    """Split `num_groups` hosts over the axes, outermost first; None if they do not factor."""
    left, dcn = num_groups, []
    for size in shape:
        f = math.gcd(size, left)
        dcn.append(f)
        left //= f
    return tuple(dcn) if left == 1 else None


def device_grid(spec: MeshSpec, devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices arranged as spec.shape: hosts over the outer axes, each host's devices inside."""
    from jax.experimental import mesh_utils

    by_process: dict[int, list[jax.Device]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    counts = {len(v) for v in by_process.values()}
    if len(by_process) > 1:
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        dcn = _hybrid_split(spec.shape, len(by_process))
        if dcn is not None and len(counts) == 1:
            ici = tuple(s // f for s, f in zip(spec.shape, dcn))
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, ordered, process_is_granule=True, allow_split_physical_axes=True)
        logger.warning("mesh %s does not split evenly over %d processes; using plain device "
                       "order (a tp group may span hosts)", spec, len(by_process))
        return np.asarray(ordered, dtype=object).reshape(spec.shape)
    try:
        return mesh_utils.create_device_mesh(spec.shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:  # exotic topologies
        logger.info("create_device_mesh refused %s (%s); using device order", spec, e)
        return np.asarray(list(devices), dtype=object).reshape(spec.shape)


def make_mesh(spec: MeshSpec | str = MeshSpec(), devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
    """Build the mesh over `devices` (default: all devices of all processes).

    A mesh smaller than the device count uses the first `spec.size` devices, which is only
    allowed on one process: with several processes every process must own part of the mesh.
    """
    import jax

    if isinstance(spec, str):
        spec = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    if spec.size > len(devices):
        raise ConfigError(
            f"mesh {spec} needs {spec.size} devices but only {len(devices)} are available")
    num_processes = len({d.process_index for d in devices})
    if num_processes > 1 and spec.size != len(devices):
        raise ConfigError(f"mesh {spec} uses {spec.size} of {len(devices)} devices; with "
                          f"{num_processes} processes the mesh must use every device")
    if spec.size < len(devices):
        devices = devices[: spec.size]
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(device_grid(spec, devices), MESH_AXES, axis_types=axis_types)


def check_model_fits(spec: MeshSpec, cfg) -> None:
    """Raise ConfigError (one line, with the numbers) if `cfg` cannot be split over `spec`.

    tp must divide the query heads and the ffn width. KV heads are split over tp when
    K % tp == 0 and replicated on every tp device when tp % K == 0 (tp > K); any other pair
    has no even layout. pp must divide the layers (stages hold equal shares).
    """
    tp, pp = spec.tp, spec.pp
    if cfg.num_heads % tp:
        raise ConfigError(f"mesh {spec}: tp={tp} does not divide num_heads={cfg.num_heads}")
    if cfg.intermediate_size % tp:
        raise ConfigError(
            f"mesh {spec}: tp={tp} does not divide intermediate_size={cfg.intermediate_size}")
    k = cfg.num_kv_heads
    if k % tp and tp % k:
        raise ConfigError(
            f"mesh {spec}: tp={tp} and num_kv_heads={k} do not fit: KV heads are split when "
            f"num_kv_heads % tp == 0 and replicated when tp % num_kv_heads == 0")
    if cfg.num_layers % pp:
        raise ConfigError(f"mesh {spec}: pp={pp} does not divide num_layers={cfg.num_layers}")
    if cfg.vocab_size % tp:
        logger.warning("mesh %s: vocab_size=%d is not a multiple of tp=%d; the embedding and "
                       "LM head are replicated instead of split", spec, cfg.vocab_size, tp)


def replica_meshes(mesh: jax.sharding.Mesh) -> list[jax.sharding.Mesh]:
    """The mesh's dp replicas as meshes of their own (dp = 1, the same pp and tp): replica r
    holds devices [r, :, :] of the grid. Each runs a whole engine (its own weights, KV pages
    and slots), as vLLM's data-parallel engine cores do."""
    import jax

    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return [jax.sharding.Mesh(mesh.devices[r: r + 1], MESH_AXES, axis_types=axis_types)
            for r in range(mesh.devices.shape[0])]
