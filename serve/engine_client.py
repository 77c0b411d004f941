"""The server's handle on its engine: one engine-core process per dp replica (or one core on a
thread of this process), and the output path that turns their tokens into streamed text.

Processes, threads and queues:

    front process (python -m serve)                          engine-core process r < dp
    ---------------------------------------------------      ---------------------------------
    asyncio loop (gRPC handlers)                             serve/engine_proc.py main loop:
      submit(req, on_output): validate, admit (max_queue),     take AddRequest / Abort
        route to the replica with the fewest in flight  ──▶    EngineCore.step(): schedule,
        PUSH AddRequest                                        dispatch, read the last step
      cancel(id): PUSH Abort                                   PUSH Steps (tokens, stats)
                                                                  │
    output thread  ◀────────────────── PULL Steps ◀───────────────┘
      OutputProcessor: detokenize, stop strings (PUSH Abort), logprobs, usage
      on_output(Output): the server's callback (hands off to asyncio, must be cheap)
      metrics: TTFT/ITL/e2e here; step host time, queue, pages from the cores' stats
      watches each core process: one that dies fails every request it held with
      finish_reason "aborted" (gRPC UNAVAILABLE) and calls `on_fatal`

The device loop thus never shares a GIL with gRPC, tokenization or detokenization (vLLM v1's
EngineCore split). dp replicas are independent processes, each on its own devices
(`CUDA_VISIBLE_DEVICES` on GPU; its own fake CPU devices on CPU), with its own weights, KV
pages and slots; a request stays on the replica it was sent to. `in_process` runs the same
core loop and wire on a thread instead (tests; a multi-host leader, which must itself be the
JAX process that drives the devices).

The front imports no JAX: it needs only the tokenizer and the cores' `Ready` info.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import zmq

from jaxinfer.engine.output import OutputProcessor
from jaxinfer.engine.request import FinishReason, Limits, Output, Request, validate_request
from jaxinfer.errors import CapacityError, ConfigError, RequestError, UnavailableError
from jaxinfer.tokenizer import Tokenizer
from serve import transport as tp

logger = logging.getLogger(__name__)

_POLL_MS = 100  # the output thread's longest wait for a message (it also watches the cores)
STATS_LOG_INTERVAL = 10.0  # seconds between the periodic stats lines (vLLM prints them too)


class _Replica:
    """The front's view of one engine core."""

    def __init__(self, index: int, sock: zmq.Socket) -> None:
        self.index = index
        self.sock = sock
        self.lock = threading.Lock()  # zmq sockets are not thread-safe
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.info: dict | None = None
        self.pid: int | None = None
        self.stats: dict = {}
        self.recompiles = 0
        self.requests: set[str] = set()
        self.sent = 0  # AddRequests sent; minus the core's `received`: still on the wire
        self.received = 0
        self.dead: str | None = None  # why it stopped, once it has
        self.stopped = False  # sent its final message after Shutdown

    def send(self, msg) -> None:
        """Send `msg`; UnavailableError when the core does not take it within a second (it
        died, or is stuck), so no caller ever blocks on a dead core."""
        data = tp.encode(msg)
        with self.lock:
            try:
                self.sock.send(data)
            except zmq.ZMQError as e:  # zmq.Again: the send timed out
                raise UnavailableError(f"engine core {self.index} is not taking requests "
                                       f"({e})") from None

    def exit_code(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        if self.thread is not None and not self.thread.is_alive() and not self.stopped:
            return -1
        return None


class EngineClient:
    """dp engine cores behind the interface `serve.server.Server` uses (module docstring).

    Build with `spawn` (processes, what `python -m serve` does) or `in_process` (threads).

    Args:
        tokenizer: the model's tokenizer (None: token ids only).
        max_queue: requests that may wait for their first output before `submit` raises
            CapacityError (per replica).
        metrics: optional `serve.metrics.PrometheusMetrics`-like sink.
        on_fatal: called (from the output thread) with a reason when a core dies.
    """

    def __init__(self, *, tokenizer: Tokenizer | None, max_queue: int = 1024, metrics=None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.ctx = zmq.Context()
        self._dir: str | None = None  # ipc socket files of engine-core processes
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._replicas: list[_Replica] = []
        self._starters: list[Callable[[], None]] = []
        self._proc = OutputProcessor(tokenizer, metrics)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._phase = "created"  # created -> warm -> running -> draining -> stopped
        self._inflight: dict[str, _Replica] = {}  # submitted, not yet completed
        self._queued: set[str] = set()  # submitted, no output yet
        self._thread: threading.Thread | None = None
        self.limits: Limits | None = None
        self.warmup_seconds: float | None = None
        self._window = {"prompt": 0.0, "generated": 0.0, "t0": time.monotonic()}

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def spawn(cls, spec: dict, *, dp: int, devices_per_replica: int, tokenizer,
              max_queue: int = 1024, metrics=None, on_fatal=None,
              progress: bool = True) -> EngineClient:
        """Engine-core processes for `spec` (model, engine, mesh of one replica, seed, quant,
        allow_pickle, compile_cache, log_level); started by `warmup`."""
        client = cls(tokenizer=tokenizer, max_queue=max_queue, metrics=metrics,
                     on_fatal=on_fatal)
        client._dir = tempfile.mkdtemp(prefix="jaxinfer-")
        from_core = f"ipc://{client._dir}/from-core"
        client._pull.bind(from_core)
        for r in range(dp):
            to_core = f"ipc://{client._dir}/to-core-{r}"
            rep = _Replica(r, tp.push(client.ctx, to_core, bind=True, send_timeout_ms=1000))
            client._replicas.append(rep)
            full = dict(spec, replica=r, to_core=to_core, from_core=from_core,
                        parent_pid=os.getpid(), progress=progress and r == 0)
            env = _replica_env(r, devices_per_replica, dp)

            def start(rep=rep, full=full, env=env) -> None:
                # A session of its own: a Ctrl-C or a signal to the front's process group must
                # reach the front, which drains and then stops its cores, not the cores first.
                rep.proc = subprocess.Popen(
                    [sys.executable, "-m", "serve.engine_proc", "--spec", json.dumps(full)],
                    env=env, start_new_session=True)
                logger.info("engine core %d: process %d", rep.index, rep.proc.pid)

            client._starters.append(start)
        return client

    @classmethod
    def in_process(cls, cores: Sequence, *, tokenizer, max_queue: int = 1024, metrics=None,
                   on_fatal=None, progress: bool = False) -> EngineClient:
        """The same wire and loop with each core (`jaxinfer.engine.core.EngineCore`, not yet
        warm) on a thread of this process."""
        from serve.engine_proc import serve_core, warm_core

        client = cls(tokenizer=tokenizer, max_queue=max_queue, metrics=metrics,
                     on_fatal=on_fatal)
        pull_addr = f"inproc://from-core-{uuid.uuid4().hex}"
        client._pull.bind(pull_addr)
        for r, core in enumerate(cores):
            addr = f"inproc://to-core-{uuid.uuid4().hex}"
            rep = _Replica(r, tp.push(client.ctx, addr, bind=True, send_timeout_ms=1000))
            client._replicas.append(rep)

            def start(rep=rep, core=core, addr=addr) -> None:
                warm_core(core, progress=progress and rep.index == 0)
                inbox = tp.pull(client.ctx, addr, bind=False)
                outbox = tp.push(client.ctx, pull_addr, bind=False)
                outbox.send(tp.encode(tp.Ready(rep.index, os.getpid(),
                                               json.dumps(core.info(), default=str))))

                def run() -> None:
                    try:
                        serve_core(core, inbox, outbox, replica=rep.index)
                    except BaseException:
                        logger.exception("engine core %d failed", rep.index)
                        raise
                    finally:
                        core.runner.close()  # a multi-host leader's tells its followers
                        inbox.close()
                        outbox.close()

                rep.thread = threading.Thread(target=run, name=f"engine-core-{rep.index}",
                                              daemon=True)
                rep.thread.start()

            client._starters.append(start)
        return client

    # -- lifecycle -------------------------------------------------------------------------
    def warmup(self, *, progress: bool = True) -> None:
        """Start every core and wait until each is warm (`Ready`); ConfigError with the core's
        own one-line reason when one cannot start."""
        if self._phase != "created":
            return
        t0 = time.perf_counter()
        for start in self._starters:
            start()
        waiting = {r.index for r in self._replicas}
        while waiting:
            if self._pull.poll(_POLL_MS):
                msg = tp.decode_from_core(self._pull.recv())
                if isinstance(msg, tp.Ready):
                    rep = self._replicas[msg.replica]
                    rep.info, rep.pid = json.loads(msg.info), msg.pid
                    lim = rep.info["limits"]
                    # Gauges before the core's first stats message: an idle, empty engine.
                    rep.stats = {**{k: 0 for k in tp.GAUGES}, "steps": 0, "preemptions": 0,
                                 "prefix_hit_tokens": 0, "prefix_lookup_tokens": 0,
                                 "generated_tokens": 0, "prefill_tokens": 0,
                                 "pages_free": lim["num_pages"], "num_slots": lim["max_running"]}
                    waiting.discard(msg.replica)
                elif isinstance(msg, tp.StartupFailed):
                    self.kill()
                    raise ConfigError(msg.message)
            for rep in self._replicas:
                code = rep.exit_code()
                if rep.index in waiting and code is not None:
                    self.kill()
                    raise ConfigError(f"engine core {rep.index} exited with code {code} while "
                                      "starting (its log is above)")
        info = self._replicas[0].info
        limits = dict(info["limits"])
        limits["max_queue"] = self.max_queue * len(self._replicas)
        self.limits = Limits.from_json({**limits, "has_tokenizer": self.tokenizer is not None})
        self.warmup_seconds = time.perf_counter() - t0
        self._phase = "warm"

    def start(self) -> None:
        """Start accepting requests (warming up first if needed)."""
        if self._phase == "created":
            self.warmup(progress=False)
        with self._lock:
            if self._phase != "warm":
                raise UnavailableError(f"engine cannot start from state {self._phase!r}")
            self._phase = "running"
        self._thread = threading.Thread(target=self._output_loop, name="engine-output",
                                        daemon=True)
        self._thread.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting requests and wait for in-flight ones; True when all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._phase == "running":
                self._phase = "draining"
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def stop(self) -> None:
        """Abort what is left (finish_reason "aborted") and stop the cores and threads: the
        cores get Shutdown (and are killed if they do not end within 10 s), the output thread
        delivers their final outputs, then the sockets close."""
        with self._lock:
            was = self._phase
            self._phase = "stopped"
        if was == "stopped":
            return
        for rep in self._replicas:
            if rep.dead is None and (rep.proc is not None or rep.thread is not None):
                try:
                    rep.send(tp.Shutdown())
                except UnavailableError:
                    pass
        for rep in self._replicas:
            if rep.proc is not None:
                try:
                    rep.proc.wait(10)
                except subprocess.TimeoutExpired:
                    logger.warning("engine core %d did not stop; killing it", rep.index)
                    rep.proc.kill()
                    rep.proc.wait()
            if rep.thread is not None:
                rep.thread.join(10)
        if self._thread is not None:
            self._thread.join(30)
        for rep in self._replicas:
            rep.sock.close()
        self._pull.close()
        self.ctx.destroy(linger=0)
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """Kill the engine-core processes at once (the server is exiting without a drain)."""
        self._kill_all()
        self._remove_dir()

    def _kill_all(self) -> None:
        for rep in self._replicas:
            if rep.proc is not None and rep.proc.poll() is None:
                rep.proc.kill()
                rep.proc.wait()

    # -- requests --------------------------------------------------------------------------
    def submit(self, req: Request, on_output: Callable[[Output], None]) -> None:
        """Validate, admit and route a request; `on_output` is called from the output thread
        with each piece of it."""
        if self.limits is None:
            raise UnavailableError("the engine is not serving yet (warming up)")
        validate_request(req, self.limits)
        with self._lock:
            if self._phase != "running":
                raise UnavailableError(
                    "the engine is draining" if self._phase == "draining" else
                    f"the engine is not serving (state {self._phase!r})")
            if req.request_id in self._inflight:
                raise RequestError(f"request_id {req.request_id!r} is already in flight")
            live = [r for r in self._replicas if r.dead is None]
            if not live:
                raise UnavailableError("no engine core is running")
            if len(self._queued) >= self.max_queue * len(live):
                raise CapacityError(f"queue full: {len(self._queued)} requests waiting "
                                    f"(max_queue {self.max_queue})")
            rep = min(live, key=lambda r: len(r.requests))
            self._inflight[req.request_id] = rep
            self._queued.add(req.request_id)
            rep.requests.add(req.request_id)
            self._proc.add(req, on_output)
            try:  # under the lock: ordered before a Shutdown, and seen by a death snapshot
                rep.send(tp.add_request(req))
                rep.sent += 1
            except UnavailableError:
                del self._inflight[req.request_id]
                self._queued.discard(req.request_id)
                rep.requests.discard(req.request_id)
                self._proc.remove(req.request_id)
                raise

    def cancel(self, request_id: str, reason: FinishReason = "cancelled") -> None:
        """Finish a request at the core's next step: its pages are freed and each unfinished
        sample gets a final Output with `reason`. Unknown or finished ids are ignored."""
        with self._lock:
            rep = self._inflight.get(request_id)
        if rep is not None and rep.dead is None:
            try:
                rep.send(tp.Abort(request_id, reason))
            except UnavailableError:  # the core is gone: the watcher fails the request
                logger.warning("cancel of %s not delivered: engine core %d is not answering",
                               request_id, rep.index)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._inflight

    # -- introspection ---------------------------------------------------------------------
    def info(self) -> dict:
        """The first core's info with the whole server's mesh and capacity."""
        infos = [r.info for r in self._replicas if r.info is not None]
        if not infos:
            return {"limits": {}, "model_config": {}}
        out = dict(infos[0])
        out["mesh"] = {**out["mesh"], "dp": len(infos),
                       "devices": [d for i in infos for d in i["mesh"]["devices"]]}
        out["limits"] = {**out["limits"], "max_queue": self.max_queue * len(infos), **{
            key: sum(i["limits"][key] for i in infos) for key in ("max_running", "num_pages")}}
        out["replicas"] = len(infos)
        out["engine_pids"] = [r.pid for r in self._replicas]
        return out

    def stats(self) -> dict:
        """Sums of the cores' latest stats, and the front's queue."""
        out: dict = {}
        for rep in self._replicas:
            for k, v in rep.stats.items():
                out[k] = out.get(k, 0) + v
        total = out.get("prefix_lookup_tokens", 0)
        out["prefix_hit_rate"] = out.get("prefix_hit_tokens", 0) / total if total else 0.0
        with self._lock:
            out["queued"] = len(self._queued)
            out["active_requests"] = len(self._inflight)
            out["num_waiting"] = self._num_waiting()
        out["recompiles"] = self.num_recompiles
        out["replicas"] = len(self._replicas)
        return out

    def _num_waiting(self) -> int:
        """Requests waiting for a decode slot: in a live core's scheduler queue, or sent and
        not yet taken by the core (vLLM's num_requests_waiting, plus the wire). `_queued` (no
        output yet) is the admission count; it also holds requests already in their prefill."""
        return sum(int(r.stats.get("waiting", 0)) + max(r.sent - r.received, 0)
                   for r in self._replicas if r.dead is None)

    @property
    def num_recompiles(self) -> int:
        return sum(r.recompiles for r in self._replicas)

    # -- output thread ---------------------------------------------------------------------
    def _output_loop(self) -> None:
        try:
            self._output_steps()
        except Exception as e:  # a bug here must not leave requests waiting forever
            logger.exception("the engine output thread failed")
            reason = f"the server's output path failed: {type(e).__name__}: {e}"
            for rid in list(self._inflight):
                self._fail_quietly(rid, reason)
            if self.on_fatal is not None:
                self.on_fatal(reason)

    def _output_steps(self) -> None:
        last_log = time.monotonic()
        while True:
            outs = self._receive(_POLL_MS)
            if outs:
                self._process(outs)
            self._watch_cores()
            now = time.monotonic()
            if now - last_log >= STATS_LOG_INTERVAL:
                self._log_stats(now - last_log)
                last_log = now
            if self._phase == "stopped" and all(r.stopped or r.dead for r in self._replicas):
                return

    def _receive(self, timeout_ms: int) -> list:
        """Every message waiting (after up to `timeout_ms` for the first): their sample
        outputs, with stats and refusals applied. Taking all at once means fewer, larger
        Outputs when this thread is behind."""
        outs = []
        if not self._pull.poll(timeout_ms):
            return outs
        while True:
            try:
                msg = tp.decode_from_core(self._pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return outs
            if isinstance(msg, tp.Steps):
                outs.extend(tp.sample_output(s) for s in msg.samples)
                self._on_stats(msg)
                for rid, message in msg.failed:
                    self._deliver(self._proc.fail(rid, message))

    def _fail_quietly(self, rid: str, reason: str) -> None:
        try:
            self._deliver(self._proc.fail(rid, reason, reason="aborted"))
        except Exception:
            logger.exception("could not fail request %s", rid)
        self._complete(rid)

    def _process(self, outs) -> None:
        done = self._proc.process(outs)
        for rid, index in done.stopped:  # a stop string: the core stops the sample silently
            rep = self._inflight.get(rid)
            if rep is not None and rep.dead is None:
                try:
                    rep.send(tp.Abort(rid, "stop", index=index, report=False))
                except UnavailableError:
                    pass  # the core is gone: the watcher fails what it held
        self._deliver(done.outputs)

    def _deliver(self, outputs) -> None:
        """Hand Outputs to their callbacks; a callback that raises fails its request alone."""
        for state, out in outputs:
            rid = out.request_id
            if rid in self._queued:
                with self._lock:
                    self._queued.discard(rid)
            if state.failed and out.finish_reason not in ("error", "aborted"):
                continue  # the request already failed: its final Outputs went out
            try:
                state.on_output(out)
            except Exception as e:
                logger.exception("request %s failed in the output path", rid)
                rep = self._inflight.get(rid)
                if rep is not None and rep.dead is None:
                    try:
                        rep.send(tp.Abort(rid, "error", report=False))
                    except UnavailableError:
                        pass
                for st, o in self._proc.fail(rid, f"{type(e).__name__}: {e}"):
                    try:
                        st.on_output(o)
                    except Exception:
                        logger.exception("on_output failed for request %s", rid)
                        break
            if state.finished:
                self._complete(rid)

    def _complete(self, rid: str) -> None:
        with self._lock:
            rep = self._inflight.pop(rid, None)
            self._queued.discard(rid)
            if rep is not None:
                rep.requests.discard(rid)
            self._idle.notify_all()

    def _on_stats(self, msg: tp.Steps) -> None:
        rep = self._replicas[msg.replica]
        stats = tp.stats_of(msg.stats)
        if msg.final:
            rep.stopped = True
        rep.received = msg.received
        cum = rep.stats
        for key in ("preemptions", "prefix_hit_tokens", "prefix_lookup_tokens",
                    "generated_tokens", "prefill_tokens"):
            cum[key] = cum.get(key, 0) + stats[key]
        cum["steps"] = cum.get("steps", 0) + msg.num_steps
        for key in tp.GAUGES:
            cum[key] = stats[key]
        self._window["prompt"] += stats["prefill_tokens"]
        self._window["generated"] += stats["generated_tokens"]
        new_recompiles = msg.recompiles - rep.recompiles
        rep.recompiles = msg.recompiles
        m = self.metrics
        if m is None:
            return
        try:
            if msg.num_steps:
                m.observe_step(stats["host_seconds"], int(stats["num_batched_tokens"]),
                               stats["schedule_seconds"])
            if stats["prefix_lookup_tokens"]:
                m.add_prefix_lookup(hit_tokens=int(stats["prefix_hit_tokens"]),
                                    prompt_tokens=int(stats["prefix_lookup_tokens"]))
            if stats["preemptions"]:
                m.add_preemptions(int(stats["preemptions"]))
            if stats.get("spec_num_draft_tokens"):
                m.add_spec_decode(
                    drafts=int(stats["spec_num_drafts"]),
                    draft_tokens=int(stats["spec_num_draft_tokens"]),
                    accepted=int(stats["spec_num_accepted_tokens"]),
                    accepted_per_pos=[int(stats[f"spec_accepted_pos_{i}"]) for i in range(7)])
            if new_recompiles > 0:
                m.add_recompiles(new_recompiles)
            live = [r.stats for r in self._replicas if r.stats]
            slots = sum(s.get("num_slots", 0) for s in live) or 1
            m.set_state(queued=self._num_waiting(),
                        running=sum(int(s.get("running", 0)) for s in live),
                        batch_occupancy=sum(s.get("running", 0) for s in live) / slots,
                        pages_used=sum(int(s.get("pages_used", 0)) for s in live),
                        pages_free=sum(int(s.get("pages_free", 0)) for s in live))
        except Exception:  # a metrics bug must not stop serving
            logger.exception("metrics update failed")

    def _watch_cores(self) -> None:
        for rep in self._replicas:
            if rep.dead is not None or rep.stopped or rep.exit_code() is None:
                continue
            outs = self._receive(0)  # a core that just ended may have said its last word
            if outs:
                self._process(outs)
            if rep.stopped:
                continue
            code = rep.exit_code()
            if self._phase == "stopped" and code == 0:
                rep.stopped = True
                continue
            reason = (f"engine core {rep.index} (pid {rep.pid}) exited with code {code}"
                      if rep.proc is not None else f"engine core {rep.index} thread failed")
            with self._lock:  # no submit slips in between marking it dead and failing
                rep.dead = reason
                held = list(rep.requests)
            logger.error("%s: failing its %d request(s)", reason, len(held))
            for rid in held:
                self._fail_quietly(rid, reason)
            if self.on_fatal is not None:
                try:
                    self.on_fatal(reason)
                except Exception:
                    logger.exception("on_fatal failed")

    def _log_stats(self, seconds: float) -> None:
        w = self._window
        s = self.stats()
        pages = s.get("pages_used", 0) + s.get("pages_free", 0)
        if w["prompt"] or w["generated"] or s.get("running"):
            logger.info("engine: prompt %.1f tok/s, generation %.1f tok/s, running %d, "
                        "waiting %d, KV cache %.1f%% used", w["prompt"] / seconds,
                        w["generated"] / seconds, s.get("running", 0),
                        s["num_waiting"],
                        100.0 * s.get("pages_used", 0) / pages if pages else 0.0)
        w["prompt"] = w["generated"] = 0.0


def _replica_env(replica: int, devices: int, dp: int) -> dict:
    """The environment of engine core `replica`: its own `devices` GPUs (a slice of the
    parent's CUDA_VISIBLE_DEVICES) and, for CPU runs, exactly `devices` host devices."""
    env = dict(os.environ)
    if dp > 1:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(dp * devices)]
        mine = ids[replica * devices: (replica + 1) * devices]
        if len(mine) < devices:
            mine = [str(replica * devices + i) for i in range(devices)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={max(devices, 1)}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env
