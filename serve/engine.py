"""The serving engine: continuous batching on one device thread, streaming on an output thread.

Threads and queues (after JetStream's orchestrator):

    submit() / cancel()             (gRPC threads: validate, then enqueue; never block)
          |  inbox: submit, cancel, finish-sample, stop      (SimpleQueue + wake Event)
          v
    +--------------------------- device thread ----------------------------+
    |  loop:                                                               |
    |    apply inbox commands     -> Scheduler (serve/scheduler.py):       |
    |    out[n] = schedule()         waiting/running, budget, pages,       |
    |                                preemption, deadlines                 |
    |    dispatch step n          -> ServingRunner (jaxinfer/serve_steps): |
    |                                decode + sampler + prefill programs,  |
    |                                async; copy_to_host_async()           |
    |    read step n-1's tokens      (step n is already queued behind it,  |
    |                                so the device stays busy)             |
    |    update_from_output(n-1)     EOS, stop ids, max_tokens, length     |
    +----------------------------------------------------------------------+
          |  outq: one list of events per step (token, finish, logprob row)
          v
    +--------------------------- output thread ----------------------------+
    |  takes every waiting step at once; per sample: detokenize            |
    |  (IncrementalDetokenizer), stop strings, logprobs, Output, usage;    |
    |  on_output(Output): the server's callback, which must be cheap (it   |
    |  hands off to asyncio with call_soon_threadsafe); TTFT/ITL/e2e       |
    +----------------------------------------------------------------------+
          |  a stop string ends a sample: finish-sample goes back to the inbox

The device thread never waits for the host without need. Step n+1 is dispatched before step
n's tokens are read: a decode row's input token lives in its device slot (`SlotState`), so the
host only needs tokens to stream them and to detect stops, one step late. A sequence that
sampled EOS therefore runs one extra step whose token is dropped. Pages are freed at once on
finish, cancel or preemption even while a step that writes them is in flight: steps execute in
dispatch order, so a later owner's writes land after it.

Static shapes. Every device call runs a program compiled at warm-up (`warmup`): a decode
model program for each (batch bucket, block-table width), a greedy and a full sampler for each
batch bucket, and a prefill program for each (rows, chunk) within the token budget, from
`EngineConfig.serve_*` through `jaxinfer.buckets`. They compile in a thread pool (XLA releases
the GIL), through JAX's persistent compilation cache when `compile_cache_dir` is set. A compile after warm-up is logged as a warning and counted in
`num_recompiles` (and `metrics.add_recompiles`): it is a bug.

Failure isolation. An exception while handling one request (its validation, its text, its
callback) fails that request alone with finish_reason "error". A failing device step fails the
sequences that were running (their cache contents are unknown), resets the cache and the
prefix cache, and the loop keeps serving.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxinfer import buckets
from jaxinfer.config import EngineConfig
from jaxinfer.errors import CapacityError, RequestError, UnavailableError
from jaxinfer.kv_cache import pages_needed
from jaxinfer.model_loader import LoadedModel
from jaxinfer.sampling import SamplingParams
from jaxinfer.serve_steps import ServingRunner
from jaxinfer.tokenizer import Tokenizer
from serve.detokenize import TextStream
from serve.scheduler import Scheduler, SchedulerOutput, Sequence
from serve.types import EngineMetrics, FinishReason, Output, Request, TokenLogprob, Usage

logger = logging.getLogger(__name__)

_IDLE_WAIT = 0.05  # seconds the device thread sleeps when it has nothing to run
_MAX_SEED = 2**63


class _Entry:
    """One request's life in the engine. The device thread owns `seqs`, `unfinished` and
    `queued`; the output thread owns `samples`, `left` and the usage counters."""

    __slots__ = (
        "completion_tokens",
        "failed",
        "first_token_time",
        "left",
        "on_output",
        "queued",
        "request",
        "samples",
        "seed",
        "seqs",
        "unfinished",
    )

    def __init__(self, request: Request, on_output: Callable[[Output], None], seed: int) -> None:
        self.request = request
        self.on_output = on_output
        self.seed = seed
        self.seqs: list[Sequence] = []
        self.unfinished = request.n
        self.queued = True  # counted in the queue until a sample is first scheduled
        self.samples: list[_Sample] | None = None  # created lazily by the output thread
        self.left = request.n
        self.completion_tokens = 0
        self.first_token_time: float | None = None
        self.failed = False


class _Sample:
    __slots__ = ("done", "last_time", "num_tokens", "text")

    def __init__(self, text: TextStream) -> None:
        self.text = text
        self.done = False
        self.last_time: float | None = None
        self.num_tokens = 0


class _Event:
    """What the device thread tells the output thread about one sample."""

    __slots__ = ("entry", "error", "finish", "index", "lp", "row", "token")

    def __init__(self, entry: _Entry, index: int, token: int | None,
                 finish: FinishReason | None, *, error: str | None = None,
                 lp: np.ndarray | None = None, row: int = 0) -> None:
        self.entry = entry
        self.index = index
        self.token = token
        self.finish = finish
        self.error = error
        self.lp = lp
        self.row = row


class Engine:
    """Continuous-batching engine over one loaded model (see the module docstring).

    Args:
        loaded: the model (config, graph, placed parameters, tokenizer).
        engine_cfg: cache geometry, serving buckets and limits.
        mesh: the device mesh the parameters live on (tp only; dp = pp = 1).
        max_queue: requests that may wait for admission before `submit` raises CapacityError.
        compile_cache_dir: JAX persistent compilation cache directory (process-wide setting).
        metrics: optional `EngineMetrics` sink.
        runner: the device steps (default: a `ServingRunner` for `loaded` on `mesh`; a
            multi-host leader passes `serve.multihost.BroadcastingRunner`).
    """

    def __init__(self, loaded: LoadedModel, engine_cfg: EngineConfig, *, mesh,
                 max_queue: int = 1024, compile_cache_dir: str | None = None,
                 metrics: EngineMetrics | None = None,
                 runner: ServingRunner | None = None) -> None:
        self.loaded = loaded
        self.model_cfg = loaded.cfg
        self.engine_cfg = engine_cfg
        self.mesh = mesh
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.max_queue = max_queue
        self.compile_cache_dir = compile_cache_dir
        self.metrics = metrics
        self.context_limit = min(engine_cfg.max_seq_len, loaded.cfg.context_limit)
        self.runner = runner or ServingRunner(loaded.cfg, engine_cfg, loaded.graphdef,
                                              loaded.params, mesh=mesh)
        self.runner.on_late_compile = self._late_compile
        self.scheduler = Scheduler(engine_cfg, eos_ids=loaded.cfg.eos_token_ids)
        self.num_recompiles = 0
        self.warmup_seconds: float | None = None
        self._cache = None
        self._slots = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._outq: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a request completes
        self._phase = "created"  # created -> warm -> running -> draining -> stopped
        self._active: dict[str, _Entry] = {}  # submitted and not yet completed (output side)
        self._queued = 0  # submitted requests not yet scheduled
        self._by_id: dict[str, _Entry] = {}  # device thread: requests with unfinished samples
        self._rng = random.SystemRandom()
        self._threads: list[threading.Thread] = []
        self._stats: dict = self._make_stats()
        self._metric_errors = 0

    # -- lifecycle -----------------------------------------------------------------------
    def warmup(self, *, progress: bool = True) -> None:
        """Compile every step program (a thread pool; progress on stderr) and run each once."""
        if self._phase != "created":
            return
        t0 = time.perf_counter()
        if self.compile_cache_dir:
            # Process-wide: the engine is what a server process runs.
            jax.config.update("jax_compilation_cache_dir", os.fspath(self.compile_cache_dir))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self._cache = self.runner.init_cache()
        self._slots = self.runner.init_state()
        keys = self.runner.program_keys()
        bar = _Progress(len(keys), "compiling serving programs", enabled=progress)
        try:
            self.runner.compile_all(self._cache, self._slots,
                                    max_workers=min(8, os.cpu_count() or 1),
                                    progress=lambda key, _: bar.update(key))
        finally:
            bar.close()
        self._cache, self._slots = self.runner.run_padding(self._cache, self._slots)
        self.warmup_seconds = time.perf_counter() - t0
        logger.info("warm-up: %d programs in %.1fs (compile %.1fs of work)", len(keys),
                    self.warmup_seconds, self.runner.compile_seconds)
        self._phase = "warm"

    def start(self) -> None:
        """Start the device and output threads (warming up first if needed)."""
        if self._phase == "created":
            self.warmup(progress=False)
        with self._lock:
            if self._phase != "warm":
                raise UnavailableError(f"engine cannot start from state {self._phase!r}")
            self._phase = "running"
        self._threads = [threading.Thread(target=self._device_loop, name="engine-device",
                                          daemon=True),
                         threading.Thread(target=self._output_loop, name="engine-output",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting requests and wait for in-flight ones; True when all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._phase == "running":
                self._phase = "draining"
            while self._active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def stop(self) -> None:
        """Abort what is left (finish_reason "aborted") and join the threads."""
        with self._lock:
            was = self._phase
            self._phase = "stopped"
        if was in ("running", "draining"):
            self._inbox.put(("stop",))
            self._wake.set()
        for t in self._threads:
            t.join()
        self._threads = []
        self.runner.close()

    # -- requests ------------------------------------------------------------------------
    def submit(self, req: Request, on_output: Callable[[Output], None]) -> None:
        """Validate and queue a request; `on_output` is called from the output thread."""
        self._validate(req)
        seed = req.sampling.seed
        if seed is None:
            seed = self._rng.randrange(0, 2**31)
        entry = _Entry(req, on_output, seed)
        with self._lock:
            if self._phase != "running":
                raise UnavailableError(
                    "engine is draining" if self._phase == "draining" else
                    f"engine is not serving (state {self._phase!r})")
            if req.request_id in self._active:
                raise RequestError(f"request_id {req.request_id!r} is already in flight")
            if self._queued >= self.max_queue:
                raise CapacityError(f"queue full: {self._queued} requests waiting "
                                    f"(max_queue {self.max_queue})")
            self._active[req.request_id] = entry
            self._queued += 1
        self._inbox.put(("submit", entry))
        self._wake.set()

    def cancel(self, request_id: str, reason: FinishReason = "cancelled") -> None:
        """Finish a request at the next step boundary: its pages are freed and each unfinished
        sample gets a final Output with `reason`. Unknown or finished ids are ignored."""
        self._inbox.put(("cancel", request_id, reason))
        self._wake.set()

    def _validate(self, req: Request) -> None:
        cfg, eng = self.model_cfg, self.engine_cfg
        prompt = req.prompt_ids
        if not isinstance(req.request_id, str) or not req.request_id:
            raise RequestError("request_id must be a non-empty string")
        if len(prompt) == 0:
            raise RequestError("prompt is empty")
        try:
            ids = np.asarray(prompt)
        except (TypeError, ValueError):
            raise RequestError("prompt token ids must be integers") from None
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise RequestError("prompt token ids must be a flat list of integers")
        bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
        if bad.size:
            raise RequestError(f"prompt token ids {bad[:5].tolist()} are outside the vocabulary "
                               f"[0, {cfg.vocab_size})")
        if not _is_int(req.max_tokens) or req.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        total = len(prompt) + req.max_tokens
        if total > self.context_limit:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({req.max_tokens}) "
                               f"= {total} exceeds the context limit {self.context_limit}")
        if pages_needed(total, eng.page_size) > eng.num_pages:
            raise RequestError(f"the request needs {pages_needed(total, eng.page_size)} KV "
                               f"pages; the pool has {eng.num_pages}")
        if not _is_int(req.n) or not 1 <= req.n <= eng.max_n:
            raise RequestError(f"n must be in [1, {eng.max_n}], got {req.n!r}")
        if not _is_int(req.logprobs) or not 0 <= req.logprobs <= eng.max_logprobs:
            raise RequestError(f"logprobs must be in [0, {eng.max_logprobs}], got "
                               f"{req.logprobs!r}")
        if not _is_int(req.priority):
            raise RequestError(f"priority must be an integer, got {req.priority!r}")
        s = req.sampling
        if not _is_int(s.top_k):
            raise RequestError(f"top_k must be an integer, got {s.top_k!r}")
        SamplingParams.make(1, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                            presence_penalty=s.presence_penalty,
                            frequency_penalty=s.frequency_penalty)
        if s.seed is not None and (not _is_int(s.seed) or not 0 <= s.seed < _MAX_SEED - req.n):
            raise RequestError(f"seed must be an integer in [0, 2**63 - n), got {s.seed!r}")
        for t in req.stop_token_ids:
            if not _is_int(t) or not 0 <= t < cfg.vocab_size:
                raise RequestError(f"stop token id {t!r} is outside the vocabulary "
                                   f"[0, {cfg.vocab_size})")
        if req.stop_strings:
            if self.tokenizer is None:
                raise RequestError("stop strings need a tokenizer; this model has none")
            if any(not isinstance(x, str) or not x for x in req.stop_strings):
                raise RequestError("stop strings must be non-empty strings")
        if req.deadline is not None and not isinstance(req.deadline, (int, float)):
            raise RequestError("deadline must be a time.monotonic() value")

    # -- introspection -------------------------------------------------------------------
    def info(self) -> dict:
        """Model, buckets, mesh and limits, for ServerInfo."""
        eng = self.engine_cfg
        return {
            "model": self.loaded.source,
            "model_config": self.model_cfg.to_json(),
            "dtype": eng.dtype, "kv_dtype": eng.kv_dtype, "kernels": eng.kernels,
            "buckets": {
                "decode_batch": list(eng.serve_decode_buckets),
                "decode_pages": list(buckets.serve_page_widths(eng)),
                "prefill_lengths": list(eng.serve_prefill_buckets),
                "prefill_rows": list(eng.serve_prefill_rows),
                "prefill_shapes": [list(s) for s in buckets.serve_prefill_shapes(eng)],
                "max_num_batched_tokens": eng.max_num_batched_tokens,
            },
            "programs": len(self.runner.program_keys()),
            "mesh": {**{str(k): int(v) for k, v in self.mesh.shape.items()},
                     "devices": [f"{d.platform}:{getattr(d, 'device_kind', 'unknown')}"
                                 for d in self.mesh.devices.flat]},
            "limits": {
                "max_seq_len": self.context_limit, "max_tokens": self.context_limit - 1,
                "max_n": eng.max_n, "max_logprobs": eng.max_logprobs,
                "max_queue": self.max_queue, "max_running": buckets.serve_num_slots(eng),
                "page_size": eng.page_size, "num_pages": eng.num_pages,
            },
        }

    def stats(self) -> dict:
        """Queue, running, pages, prefix hit rate, preemptions, steps (a recent snapshot)."""
        out = dict(self._stats)
        with self._lock:
            out["queued"] = self._queued
            out["active_requests"] = len(self._active)
        out["recompiles"] = self.num_recompiles
        return out

    def num_in_flight(self) -> int:
        """Requests submitted and not yet completed (what data-parallel routing balances)."""
        return len(self._active)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._active

    def _make_stats(self) -> dict:
        s = self.scheduler.stats()
        s["queued"] = 0
        return s

    def _late_compile(self, key: tuple, seconds: float) -> None:
        self.num_recompiles += 1
        logger.warning("compiled %s after warm-up (%.2fs): a shape outside the warm-up set",
                       key, seconds)
        self._metric("add_recompiles", 1)

    def _metric(self, name: str, *args, **kw) -> None:
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, name)(*args, **kw)
        except Exception:  # a metrics bug must not stop serving
            self._metric_errors += 1
            if self._metric_errors <= 3:
                logger.exception("metrics.%s failed", name)

    # -- device thread -------------------------------------------------------------------
    def _device_loop(self) -> None:
        sched = self.scheduler
        pending: tuple | None = None  # (SchedulerOutput, decode out, prefill out)
        stopping = False
        while not stopping:
            events: list[_Event] = []
            stopping = self._apply_inbox(events)
            if stopping:
                break
            t0 = time.perf_counter()
            failed = None
            handle = None
            sched_s = 0.0
            try:
                so = sched.schedule()
                self._after_schedule(so, events)
                sched_s = time.perf_counter() - t0
                if so.has_work:
                    try:
                        handle = self._dispatch(so)
                    except Exception as e:
                        failed = (so, e)
            except Exception:
                logger.exception("scheduling failed; failing every unfinished request")
                self._fail_all(events, "internal scheduling error")
                so = None
            host = time.perf_counter() - t0
            if pending is not None:
                try:
                    results = (np.asarray(pending[1]) if pending[1] is not None else None,
                               np.asarray(pending[2]) if pending[2] is not None else None)
                except Exception as e:
                    sched.discard(pending[0])
                    self._device_failure(e, events)
                    results = None
                t1 = time.perf_counter()
                if results is not None:
                    self._apply_results(pending[0], results, events)
                t2 = time.perf_counter()
                host += t2 - t1
                sched_s += t2 - t1
            if failed is not None:
                sched.discard(failed[0])
                self._device_failure(failed[1], events)
                handle = None
            pending = handle
            if events:
                self._outq.put(events)
            if so is not None:
                self._publish(so, host, sched_s)
            if pending is None and not events:
                self._wake.wait(_IDLE_WAIT if not sched.has_unfinished() else 0.001)
                self._wake.clear()
        # Stopping: abort everything, read the last step so nothing is left in flight.
        events = []
        if pending is not None:
            try:
                jax.block_until_ready((pending[1], pending[2]))
            except Exception as e:
                logger.debug("last step failed while stopping: %s", e)
            sched.discard(pending[0])
        for seq in sched.abort_all("aborted"):
            self._seq_done(seq, events, "aborted")
        self._outq.put(events)
        self._outq.put(None)

    def _apply_inbox(self, events: list[_Event]) -> bool:
        """Apply queued commands; True when asked to stop."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return False
            kind = cmd[0]
            if kind == "stop":
                return True
            try:
                if kind == "submit":
                    self._add(cmd[1])
                elif kind == "cancel":
                    entry = self._by_id.get(cmd[1])
                    if entry is not None:
                        for seq in entry.seqs:
                            if self.scheduler.finish(seq, cmd[2]):
                                self._seq_done(seq, events, cmd[2])
                elif kind == "finish":  # the output thread already sent the final Output
                    seq, reason = cmd[1], cmd[2]
                    if self.scheduler.finish(seq, reason):
                        self._seq_done(seq, None, reason)
            except Exception as e:
                logger.exception("engine command %s failed", kind)
                entry = cmd[1] if kind == "submit" else self._by_id.get(cmd[1]) \
                    if kind == "cancel" else getattr(cmd[1], "tag", None)
                if isinstance(entry, _Entry):
                    self._fail_entry(entry, events, f"{type(e).__name__}: {e}")

    def _add(self, entry: _Entry) -> None:
        seqs = self.scheduler.add_request(entry.request, seed=entry.seed)
        for s in seqs:
            s.tag = entry
        entry.seqs = seqs
        self._by_id[entry.request.request_id] = entry

    def _after_schedule(self, so: SchedulerOutput, events: list[_Event]) -> None:
        for seq in so.finished:  # deadlines
            self._seq_done(seq, events, seq.finish_reason)
        for seq in so.prefill_seqs:
            entry = seq.tag
            if entry.queued:
                entry.queued = False
                with self._lock:
                    self._queued -= 1
        for hit, total in so.lookups:
            self._metric("add_prefix_lookup", hit_tokens=hit, prompt_tokens=total)
        if so.preempted:
            self._metric("add_preemptions", len(so.preempted))

    def _dispatch(self, so: SchedulerOutput) -> tuple:
        runner = self.runner
        out_d = out_p = None
        if so.decode_seqs:
            self._cache, self._slots, out_d = runner.decode(
                self._cache, self._slots, slots=so.decode_slots, positions=so.decode_positions,
                block_tables=so.decode_block_tables, full=so.decode_full)
            out_d.copy_to_host_async()
        if so.prefill_seqs:
            self._cache, self._slots, out_p = runner.prefill(
                self._cache, self._slots, tokens=so.prefill_tokens,
                block_tables=so.prefill_block_tables, slots=so.prefill_slots,
                starts=so.prefill_starts, lens=so.prefill_lens, sample=so.prefill_sample,
                prompt_lens=so.prefill_prompt_lens, int_params=so.prefill_int_params,
                float_params=so.prefill_float_params)
            out_p.copy_to_host_async()
        return so, out_d, out_p

    def _apply_results(self, so: SchedulerOutput, results: tuple, events: list[_Event]) -> None:
        dec, pre = results
        d_tok = dec[:, 0] if dec is not None else np.zeros(0, np.int32)
        p_tok = pre[:, 0] if pre is not None else np.zeros(0, np.int32)
        for ev in self.scheduler.update_from_output(so, d_tok, p_tok):
            seq = ev.seq
            entry = seq.tag
            lp = None
            if entry.request.logprobs:
                lp = pre if ev.is_prefill else dec
            events.append(_Event(entry, seq.index, ev.token, ev.finish_reason, lp=lp,
                                 row=ev.row))
            if ev.finish_reason is not None:
                self._seq_done(seq, None, ev.finish_reason)

    def _seq_done(self, seq: Sequence, events: list[_Event] | None, reason: FinishReason,
                  error: str | None = None) -> None:
        """Book a finished sequence; with `events`, tell the output thread (no token)."""
        entry: _Entry = seq.tag
        if events is not None:
            events.append(_Event(entry, seq.index, None, reason, error=error))
        entry.unfinished -= 1
        if entry.unfinished == 0:
            self._by_id.pop(entry.request.request_id, None)
            if entry.queued:
                entry.queued = False
                with self._lock:
                    self._queued -= 1

    def _fail_entry(self, entry: _Entry, events: list[_Event], message: str) -> None:
        if not entry.seqs:  # never reached the scheduler
            entry.unfinished = 0
            with self._lock:
                if entry.queued:
                    entry.queued = False
                    self._queued -= 1
            for i in range(entry.request.n):
                events.append(_Event(entry, i, None, "error", error=message))
            return
        for seq in entry.seqs:
            if self.scheduler.finish(seq, "error"):
                self._seq_done(seq, events, "error", message)

    def _fail_all(self, events: list[_Event], message: str) -> None:
        for seq in self.scheduler.abort_all("error"):
            self._seq_done(seq, events, "error", message)

    def _device_failure(self, exc: BaseException, events: list[_Event]) -> None:
        """A device step failed: its sequences' cache contents are unknown. Fail every running
        sequence, start from a fresh cache and an empty prefix cache, keep serving."""
        logger.error("device step failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        message = f"device step failed: {type(exc).__name__}: {exc}"
        for seq in list(self.scheduler.running):
            if self.scheduler.finish(seq, "error"):
                self._seq_done(seq, events, "error", message)
        self.scheduler.kv.reset_prefix_cache()
        self._cache = self.runner.init_cache()
        self._slots = self.runner.init_state()

    def _publish(self, so: SchedulerOutput, host_seconds: float, schedule_seconds: float) -> None:
        sched = self.scheduler
        stats = sched.stats()
        self._stats = stats
        if so.has_work:
            self._metric("observe_step", host_seconds, so.num_batched_tokens, schedule_seconds)
        self._metric("set_state", queued=sched.num_waiting, running=sched.num_running,
                     batch_occupancy=len(so.decode_seqs) / sched.num_slots,
                     pages_used=stats["pages_used"], pages_free=stats["pages_free"])

    # -- output thread -------------------------------------------------------------------
    def _output_loop(self) -> None:
        closing = False
        while not closing:
            batch = self._outq.get()
            if batch is None:
                break
            events = list(batch)
            # Take every step already waiting: when this thread lags, a sample's tokens of
            # several steps go through one detokenizer call and one Output, so the work per
            # token shrinks exactly when it has to.
            while True:
                try:
                    more = self._outq.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                events.extend(more)
            now = time.monotonic()
            groups: dict[tuple[int, int], list[_Event]] = {}
            for ev in events:
                groups.setdefault((id(ev.entry), ev.index), []).append(ev)
            for evs in groups.values():
                # Hand the GIL over between samples: this thread is pure Python, and without it
                # the device thread could wait up to the interpreter's switch interval (5 ms)
                # each time it comes back from a JAX call.
                time.sleep(0)
                entry = evs[0].entry
                if entry.failed:
                    continue
                try:
                    if entry.request.stop_strings:  # token by token: find the exact stop
                        for ev in evs:
                            self._emit(entry, ev.index, [ev], now)
                    else:
                        self._emit(entry, evs[0].index, evs, now)
                except Exception as e:
                    logger.exception("request %s failed in the output path",
                                     entry.request.request_id)
                    self._fail_output(entry, f"{type(e).__name__}: {e}")

    def _samples(self, entry: _Entry) -> list[_Sample]:
        if entry.samples is None:
            req = entry.request
            entry.samples = [_Sample(TextStream(self.tokenizer, req.prompt_ids, req.stop_strings))
                             for _ in range(req.n)]
        return entry.samples

    def _emit(self, entry: _Entry, index: int, evs: list[_Event], now: float) -> None:
        """One Output for sample `index` from its events (in order) of one or more steps."""
        sample = self._samples(entry)[index]
        if sample.done:
            return
        last = evs[-1]
        finish, error = last.finish, last.error
        tokens = tuple(ev.token for ev in evs if ev.token is not None)
        logprobs: tuple[TokenLogprob, ...] = ()
        if tokens:
            # A stop token's (or EOS's) own text is not part of the output.
            shown = tokens[:-1] if finish == "stop" and last.token is not None else tokens
            text = sample.text.add(shown, final=finish is not None)
            if entry.request.logprobs:
                k = entry.request.logprobs
                logprobs = tuple(_token_logprob(ev.lp[ev.row], ev.token, k) for ev in evs
                                 if ev.token is not None)
            n = len(tokens)
            sample.num_tokens += n
            entry.completion_tokens += n
            if entry.first_token_time is None:
                entry.first_token_time = now
                self._metric("observe_ttft", now - entry.request.arrival)
            if sample.last_time is not None:
                for _ in range(n):
                    self._metric("observe_itl", (now - sample.last_time) / n)
            sample.last_time = now
            if sample.text.stopped:
                if finish is None:  # the device thread still runs it: free it there
                    self._inbox.put(("finish", entry.seqs[index], "stop"))
                    self._wake.set()
                finish, error = "stop", None
        else:
            text = "" if sample.text.stopped else sample.text.add((), final=True)
        if finish is not None:
            sample.done = True
            entry.left -= 1
        usage = None
        if finish is not None and entry.left == 0:
            cached = max(entry.seqs[0].num_cached_tokens, 0) if entry.seqs else 0
            usage = Usage(prompt_tokens=len(entry.request.prompt_ids),
                          completion_tokens=entry.completion_tokens, cached_tokens=cached)
        entry.on_output(Output(request_id=entry.request.request_id, index=index,
                               token_ids=tokens, text=text, logprobs=logprobs,
                               finish_reason=finish, error=error, usage=usage))
        if usage is not None:
            self._complete(entry, now)

    def _fail_output(self, entry: _Entry, message: str) -> None:
        """Fail a request from the output thread: final error Outputs, then free its
        sequences on the device thread."""
        entry.failed = True
        for i, sample in enumerate(self._samples_or_none(entry)):
            if sample is not None and sample.done:
                continue
            try:
                entry.on_output(Output(request_id=entry.request.request_id, index=i,
                                       finish_reason="error", error=message,
                                       usage=None))
            except Exception:
                logger.exception("on_output failed for request %s", entry.request.request_id)
                break
        for seq in entry.seqs:
            self._inbox.put(("finish", seq, "error"))
        self._wake.set()
        self._complete(entry, time.monotonic())

    @staticmethod
    def _samples_or_none(entry: _Entry) -> list:
        return entry.samples if entry.samples is not None else [None] * entry.request.n

    def _complete(self, entry: _Entry, now: float) -> None:
        if not entry.failed:
            self._metric("observe_e2e", now - entry.request.arrival)
        with self._lock:
            if self._active.get(entry.request.request_id) is entry:
                del self._active[entry.request.request_id]
            self._idle.notify_all()


def _token_logprob(row: np.ndarray, token: int, k: int) -> TokenLogprob:
    """Parse one row [2 + 2K] of a step's packed output (see jaxinfer.serve_steps)."""
    kmax = (len(row) - 2) // 2
    lp = row[1:2].view(np.float32)[0]
    ids = row[2: 2 + kmax]
    lps = row[2 + kmax:].view(np.float32)
    top = tuple((int(ids[i]), float(lps[i])) for i in range(min(k, kmax)))
    return TokenLogprob(token_id=token, logprob=float(lp), top=top)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class _Progress:
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
