"""The engine-core process: one `jaxinfer.engine.core.EngineCore` (scheduler + device loop)
behind the ZeroMQ wire of `serve/transport.py` (vLLM v1's EngineCoreProc).

    python -m serve.engine_proc --spec JSON      (started by serve/engine_client.py)

It loads the model on its own devices (the front restricts them per dp replica), warms up,
says `Ready` with its info, then loops:

    take every message waiting (AddRequest, Abort, Shutdown)  non-blocking while there is work
    step the core (schedule, dispatch, read the previous step)
    send the step's outputs and stats (one `Steps` message)

Nothing else runs in this process, so no streaming or detokenizing thread competes with the
device loop for the GIL. A request the core refuses comes back in `Steps.failed`; an error
before `Ready` comes back as `StartupFailed` and the process exits 1. If the front goes away
(its process ends), the core stops. `serve_core` is the same loop on a thread of the front's
own process (tests; multi-host serving, whose process 0 must be the JAX process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time

import zmq

from jaxinfer.errors import JaxinferError
from serve import transport as tp

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 50  # how long an idle core waits for a message before looking around again
_STATS_EVERY = 0.5  # seconds between stats messages of an idle core (gauges stay current)
_MAX_SEND_WAIT_S = 120  # a front that reads nothing this long is gone (in-process cores)


def serve_core(core, inbox: zmq.Socket, outbox: zmq.Socket, *, replica: int = 0,
               parent_pid: int | None = None) -> None:
    """Run `core` on messages from `inbox` until Shutdown; outputs go to `outbox`."""
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    outbox.setsockopt(zmq.SNDTIMEO, 1000)
    send = _Sender(outbox, replica, core, parent_pid)
    last_sent = last_check = 0.0
    while True:
        now = time.monotonic()
        if parent_pid is not None and now - last_check > 1.0:
            last_check = now
            if os.getppid() != parent_pid:
                logger.warning("the server process went away: stopping")
                return
        busy = core.has_unfinished()
        timeout = 0 if busy else _IDLE_POLL_MS
        failed: list[tuple[str, str]] = []
        stopping = False
        while poller.poll(timeout):
            timeout = 0
            msg = tp.decode_to_core(inbox.recv())
            if isinstance(msg, tp.AddRequest):
                send.received += 1
                try:
                    core.add_request(tp.request_of(msg))
                except JaxinferError as e:
                    failed.append((msg.request_id, str(e)))
                except Exception as e:  # a request must never take the core down
                    logger.exception("request %s refused", msg.request_id)
                    failed.append((msg.request_id, f"{type(e).__name__}: {e}"))
            elif isinstance(msg, tp.Abort):
                core.abort(msg.request_id, msg.reason,
                           index=None if msg.index < 0 else msg.index, report=msg.report)
            else:
                stopping = True
                break
        if stopping:
            outs = core.drain_pending() + core.abort_all("aborted", "the server stopped")
            send(outs, None, 0, failed, final=True)
            return
        if core.has_unfinished():
            outs, stats = core.step()
            if not send(outs, stats, 1, failed):
                return
            last_sent = time.monotonic()
        elif failed or time.monotonic() - last_sent > _STATS_EVERY:
            if not send([], None, 0, failed):
                return
            last_sent = time.monotonic()


class _Sender:
    """Sends a step's `Steps` message; blocks while the front is slow (backpressure), gives up
    when the front's process is gone."""

    def __init__(self, outbox: zmq.Socket, replica: int, core, parent_pid: int | None) -> None:
        self.outbox, self.replica, self.core, self.parent_pid = outbox, replica, core, parent_pid
        self.received = 0  # AddRequests taken (refused ones too)

    def __call__(self, outs, stats, num_steps: int, failed, *, final: bool = False) -> bool:
        from jaxinfer.engine.request import StepStats

        if stats is None:
            sched = self.core.scheduler
            stats = StepStats(waiting=sched.num_waiting, running=sched.num_running,
                              pages_used=sched.kv.num_used, pages_free=sched.kv.num_free,
                              num_slots=sched.num_slots)
        data = tp.encode(tp.Steps(self.replica, [tp.sample_of(o) for o in outs],
                                  tp.stats_list(stats), num_steps, self.core.num_recompiles,
                                  failed, final, self.received))
        for waited in itertools.count(1):
            try:
                self.outbox.send(data)
                return True
            except zmq.Again:  # SNDTIMEO passed: is anyone still reading?
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    logger.warning("the server process went away: stopping")
                    return False
                if waited >= _MAX_SEND_WAIT_S:
                    logger.error("nobody read the engine's outputs for %d s: stopping", waited)
                    return False
        return False


class Progress:
    """A progress bar on stderr: tqdm when installed, else one rewritten line."""

    def __init__(self, total: int, desc: str, *, enabled: bool) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._bar = None
        self.enabled = enabled
        self._t0 = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="program")
            except ImportError:
                self._line()

    def update(self, key: tuple) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str("x".join(map(str, key)), refresh=False)
        elif self.enabled:
            self._line()

    def _line(self) -> None:
        width = 30
        filled = width * self.n // max(self.total, 1)
        sys.stderr.write(f"\r{self.desc}: [{'#' * filled}{' ' * (width - filled)}] "
                         f"{self.n}/{self.total} {time.perf_counter() - self._t0:.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def warm_core(core, *, progress: bool) -> None:
    """Compile every program with a progress bar, run each once."""
    bar = Progress(len(core.runner.program_keys()), "compiling engine programs",
                   enabled=progress)
    try:
        core.warmup(max_workers=min(8, os.cpu_count() or 1), progress=bar.update)
    finally:
        bar.close()


def build_core(spec: dict):
    """Load the model of `spec` on this process's devices and make its core (not warm)."""
    import jax

    from jaxinfer.config import EngineConfig
    from jaxinfer.engine.core import EngineCore
    from jaxinfer.model_loader import load_model
    from sharding.mesh import make_mesh

    if spec.get("compile_cache"):
        jax.config.update("jax_compilation_cache_dir", os.fspath(spec["compile_cache"]))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    engine_cfg = engine_config_of(spec["engine"])
    mesh = make_mesh(spec["mesh"])
    loaded = load_model(spec["model"], mesh=mesh, dtype=engine_cfg.dtype, seed=spec["seed"],
                        allow_pickle=spec["allow_pickle"], quant=spec.get("quant"))
    return EngineCore.create(loaded, engine_cfg, mesh=mesh)


def engine_config_of(fields: dict):
    """An EngineConfig from its JSON fields (lists back to tuples)."""
    from jaxinfer.config import EngineConfig

    return EngineConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the front process ends, however it ends (a core must never
    outlive its server and hold the devices)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) is not available")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.engine_proc",
                                description="An engine-core process of `python -m serve`.")
    p.add_argument("--spec", required=True, help="JSON: model, engine, mesh, addresses, ...")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    _die_with_parent()
    logging.basicConfig(level=spec.get("log_level", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s core{spec['replica']} %(name)s: "
                               "%(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    ctx = zmq.Context()
    inbox = tp.pull(ctx, spec["to_core"], bind=False)
    outbox = tp.push(ctx, spec["from_core"], bind=False)
    replica = int(spec["replica"])
    try:
        core = build_core(spec)
        warm_core(core, progress=spec.get("progress", False))
    except (JaxinferError, OSError) as e:
        outbox.send(tp.encode(tp.StartupFailed(replica, str(e))))
        time.sleep(0.2)  # let the message leave before the process does
        return 1
    outbox.send(tp.encode(tp.Ready(replica, os.getpid(), json.dumps(core.info(), default=str))))
    try:
        serve_core(core, inbox, outbox, replica=replica, parent_pid=spec.get("parent_pid"))
    finally:
        core.runner.close()
    time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
