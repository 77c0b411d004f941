"""The engine core: one scheduler and one runner, stepped synchronously (vLLM v1's EngineCore).

Offline generation (`jaxinfer.engine.llm`), the bench and the server's engine-core process
(`serve/engine_proc.py`) all drive this same object: `add_request`, `abort`, and `step()` in a
loop. Nothing here detokenizes or streams; `step()` returns `SampleOutput`s (token ids, packed
logprob rows, finish reasons) that an output processor (`jaxinfer.engine.output`) turns into
text.

One step, with the host off the critical path:

    schedule step n (jaxinfer.engine.scheduler)        host, ~0.1-0.3 ms
    dispatch step n: decode program, prefill program   asynchronous; copy_to_host_async()
    read step n-1's outputs                            step n is already queued behind it
    apply them: EOS, stop ids, max_tokens, length      host

Step n+1 is dispatched before step n's tokens are read: a decode row's input token lives in its
device slot (`jaxinfer.steps.SlotState`), so the host needs tokens only to report them and to
detect stops, one step late. Pages are freed at once on finish, cancel or preemption even while
a step that writes them is in flight: steps execute in dispatch order, so a later owner's
writes land after it.

Failure isolation: a request that fails its own handling fails alone (finish_reason "error");
a failing device step fails the sequences that were running (their cache contents are
unknown), resets the cache, the slots and the prefix cache, and the core keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable

import numpy as np

from jaxinfer import buckets
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.engine.request import (FinishReason, Limits, Request, SampleOutput, StepStats,
                                     validate_request)
from jaxinfer.engine.scheduler import Scheduler, SchedulerOutput, Sequence
from jaxinfer.engine.spec_plan import SpecPlan
from jaxinfer.errors import ConfigError, RequestError
from jaxinfer.kv_cache import max_pages, memory_stats, page_bytes, size_pool
from jaxinfer.runner import Runner
from sharding.mesh import MeshSpec

logger = logging.getLogger(__name__)


class _Entry:
    """One request's samples in the core."""

    __slots__ = ("request", "seqs", "unfinished")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.seqs: list[Sequence] = []
        self.unfinished = request.n


class EngineCore:
    """A scheduler and a runner; `step()` runs one engine step (see the module docstring).

    Args:
        runner: the device programs and state (`warmup` compiles and runs them once).
        has_tokenizer: whether the fronts can detokenize (stop strings need it).

    The core accepts every valid request; the fronts bound their queues (`max_queue`).
    """

    def __init__(self, runner: Runner, *, has_tokenizer: bool = True, model: str = "",
                 quant: str = "none") -> None:
        self.runner = runner
        self.model_name = model  # the preset name or directory it was loaded from
        self.quant = quant
        self.model_cfg: ModelConfig = runner.model_cfg
        self.engine_cfg: EngineConfig = runner.engine_cfg
        spec = self.engine_cfg.speculative if runner.proposer is not None else None
        plan = None
        if spec is not None:
            tiers = runner.spec_tiers()
            plan = SpecPlan(tiers=tiers, adaptive=spec.adaptive,
                            plain_steps=self.engine_cfg.decode_steps,
                            catch_up=runner.proposer.catch_up)
        self.spec = spec
        self.scheduler = Scheduler(self.engine_cfg, eos_ids=self.model_cfg.eos_token_ids,
                                   spec=plan)
        # vLLM's speculative-decoding counters (the server exports them).
        self.spec_counts = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                            "accepted_per_pos": [0] * (spec.k if spec else 0)}
        # Decode dispatches per speculative tier (k = 0: plain), for the bench's diagnosis.
        self.tier_steps: dict[int, int] = dict.fromkeys(runner.spec_tiers(), 0)
        # Per sample, when a caller asks (offline generation reports them per completion):
        # (request_id, index) -> [num_drafts, num_draft_tokens, num_accepted_tokens].
        self.spec_by_sample: dict[tuple[str, int], list[int]] | None = None
        self.has_tokenizer = has_tokenizer
        self.context_limit = min(self.engine_cfg.max_seq_len, self.model_cfg.context_limit)
        self.num_recompiles = 0
        self.warmup_seconds: float | None = None
        self.runner.on_late_compile = self._late_compile
        self._entries: dict[str, _Entry] = {}
        self._pending: tuple[SchedulerOutput, object, object] | None = None
        self._last_read: float | None = None  # when the last step's results were read
        self._rng = random.SystemRandom()
        self._aborted: list[SampleOutput] = []

    # -- set-up ----------------------------------------------------------------------------
    @classmethod
    def create(cls, loaded, engine_cfg: EngineConfig, *, mesh,
               runner_factory: Callable[..., Runner] = Runner) -> EngineCore:
        """A core for `loaded` (a `jaxinfer.model_loader.LoadedModel` placed on `mesh`), with
        the kernel choice and the KV pool size resolved (`resolve_engine_config`).
        `runner_factory(model_cfg, engine_cfg, graphdef, params, mesh=...)` makes the runner
        (a multi-host leader passes one that also drives the other processes)."""
        proposer, spec = None, engine_cfg.speculative
        if spec is not None:
            import jax

            from jaxinfer.speculative.api import TargetInfo, make_proposer

            if MeshSpec.of(mesh).pp > 1:
                raise ConfigError("speculative decoding runs on meshes with pp = 1")
            eng0 = dataclasses.replace(
                engine_cfg, kernels=engine_cfg.resolved_kernels(jax.default_backend()))
            proposer = make_proposer(spec, TargetInfo(
                model_cfg=loaded.cfg, engine_cfg=eng0, mesh=mesh, graphdef=loaded.graphdef,
                params=loaded.params, dtype=engine_cfg.dtype, kernels=eng0.kernels,
                unroll_layers=eng0.layer_unroll))
        eng = resolve_engine_config(loaded.cfg, engine_cfg, mesh,
                                    extra_page_bytes=getattr(proposer, "extra_page_bytes", 0))
        kw = {"proposer": proposer, "spec": spec} if proposer is not None else {}
        runner = runner_factory(loaded.cfg, eng, loaded.graphdef, loaded.params, mesh=mesh, **kw)
        return cls(runner, has_tokenizer=loaded.tokenizer is not None, model=loaded.source,
                   quant=loaded.quant)

    def limits(self) -> Limits:
        eng = self.engine_cfg
        return Limits(vocab_size=self.model_cfg.vocab_size, max_seq_len=self.context_limit,
                      max_tokens=self.context_limit - 1, max_n=eng.max_n,
                      max_logprobs=eng.max_logprobs, max_stop_token_ids=eng.max_stop_token_ids,
                      page_size=eng.page_size, num_pages=eng.pool_pages,
                      has_tokenizer=self.has_tokenizer)

    def warmup(self, *, max_workers: int = 8, progress=None) -> None:
        """Compile every program (a thread pool) and run each once on padding rows."""
        t0 = time.perf_counter()
        self.runner.init_state()
        self.runner.compile_all(max_workers=max_workers, progress=progress)
        self.runner.run_padding()
        if self.scheduler.spec is not None and self.scheduler.spec.adaptive:
            self.scheduler.spec.costs = self.runner.step_costs()
            logger.info("speculative tier costs (k, batch): %s", {
                key: round(v * 1e3, 3) for key, v in self.scheduler.spec.costs.items()})
        self.warmup_seconds = time.perf_counter() - t0
        logger.info("warm-up: %d programs in %.1fs (compile %.1fs of work)",
                    len(self.runner.program_keys()), self.warmup_seconds,
                    self.runner.compile_seconds)

    def info(self) -> dict:
        """Model, buckets, mesh and limits (for ServerInfo and the fronts' Limits)."""
        eng, runner = self.engine_cfg, self.runner
        mesh = runner.mesh
        return {
            "model": self.model_name, "quant": self.quant,
            "model_config": self.model_cfg.to_json(),
            "dtype": eng.dtype, "kv_dtype": eng.kv_dtype, "kernels": runner.kernels,
            "buckets": {
                "decode_batch": list(eng.batch_buckets),
                "decode_pages": list(buckets.page_widths(eng)),
                "decode_steps": list(buckets.decode_step_counts(eng)),
                "prefill_lengths": list(eng.prefill_buckets),
                "prefill_rows": list(eng.prefill_rows),
                "prefill_shapes": [list(s) for s in buckets.prefill_shapes(eng)],
                "max_num_batched_tokens": eng.max_num_batched_tokens,
            },
            "programs": len(runner.program_keys()),
            "speculative": (None if self.spec is None else
                            {**self.spec.to_json(), "tiers": list(runner.spec_tiers())}),
            "mesh": {**{str(k): int(v) for k, v in mesh.shape.items()},
                     "devices": [f"{d.platform}:{getattr(d, 'device_kind', 'unknown')}"
                                 for d in mesh.devices.flat]},
            "limits": {**self.limits().to_json(), "max_running": eng.num_slots},
            "kv_cache_bytes": runner.cache.nbytes() if runner.cache is not None else 0,
            "warmup_seconds": self.warmup_seconds,
        }

    # -- requests ------------------------------------------------------------------------
    def add_request(self, req: Request, *, seed: int | None = None) -> None:
        """Queue a request (validated again here: the core may be driven directly). `seed`
        overrides the request's; with neither, a random one."""
        validate_request(req, self.limits())
        if req.request_id in self._entries:
            raise RequestError(f"request_id {req.request_id!r} is already in flight")
        if seed is None:
            seed = req.sampling.seed
        if seed is None:
            seed = self._rng.randrange(0, 2**31)
        entry = _Entry(req)
        entry.seqs = self.scheduler.add_request(req, seed=seed)
        for s in entry.seqs:
            s.tag = entry
        self._entries[req.request_id] = entry

    def abort(self, request_id: str, reason: FinishReason = "cancelled", *,
              index: int | None = None, report: bool = True) -> None:
        """Finish a request's unfinished samples (or only sample `index`) at once: their pages
        and slots are freed. With `report`, the next `step()` returns a final SampleOutput with
        `reason` for each; without (a stop string the caller found itself), nothing. Unknown or
        finished ids are ignored."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        for seq in entry.seqs:
            if index is not None and seq.index != index:
                continue
            if self.scheduler.finish(seq, reason):
                self._done(seq, self._aborted if report else None, reason)

    def abort_all(self, reason: FinishReason, error: str | None = None) -> list[SampleOutput]:
        """Finish everything (shutdown); returns the final outputs."""
        out: list[SampleOutput] = []
        for seq in self.scheduler.abort_all(reason):
            self._done(seq, out, reason, error)
        out = self._aborted + out
        self._aborted = []
        return out

    def has_unfinished(self) -> bool:
        return bool(self._entries) or self._pending is not None

    @property
    def num_requests(self) -> int:
        return len(self._entries)

    # -- the step --------------------------------------------------------------------------
    def step(self) -> tuple[list[SampleOutput], StepStats]:
        """Schedule and dispatch one step, then read and apply the previous one. Host time
        leaves out the wait for the device (reading the previous step's outputs)."""
        sched = self.scheduler
        t0 = time.perf_counter()
        outputs: list[SampleOutput] = self._aborted
        self._aborted = []
        stats = StepStats()
        handle = None
        so = sched.schedule()
        for seq in so.finished:  # deadlines
            self._done(seq, outputs, seq.finish_reason)
        t_sched = time.perf_counter() - t0
        if so.has_work:
            try:
                handle = self._dispatch(so)
                if so.decode_seqs and so.spec_k in self.tier_steps:
                    self.tier_steps[so.spec_k] += 1
            except Exception as e:  # a step that cannot even be dispatched
                sched.discard(so)
                self._device_failure(e, outputs)
        host = time.perf_counter() - t0
        if self._pending is not None:
            done, self._pending = self._pending, None
            results = self._read(done, outputs)
            if results is None and handle is not None:  # it was queued behind the failure
                sched.discard(handle[0])
                handle = None
            elif results is not None:
                self._observe_cost(done[0])
                t2 = time.perf_counter()
                stats.generated_tokens = self._apply(done[0], *results, outputs, stats)
                applied = time.perf_counter() - t2
                host += applied
                t_sched += applied
        self._pending = handle
        if handle is None:
            self._last_read = None  # the device goes idle: the next interval is no step's cost
        stats.host_seconds = host
        self._fill_stats(stats, so, t_sched)
        return outputs, stats

    def _observe_cost(self, so: SchedulerOutput) -> None:
        """Adaptive depth: time between two reads of back-to-back steps is what the later one
        cost the engine (the device's time, or the host's where it was slower); decode-only
        steps of a timed shape update their tier's cost."""
        now, last = time.perf_counter(), self._last_read
        self._last_read = now
        plan = self.scheduler.spec
        if (last is None or plan is None or not plan.adaptive or not so.decode_seqs
                or so.prefill_seqs or (not so.spec_k and so.num_steps != plan.plain_steps)):
            return
        plan.observe(so.spec_k, so.decode_shape[0], now - last)

    def _fill_stats(self, stats: StepStats, so: SchedulerOutput, t_sched: float) -> None:
        sched = self.scheduler
        stats.schedule_seconds = t_sched
        stats.num_batched_tokens = so.num_batched_tokens
        stats.num_steps = so.num_steps if so.decode_seqs else 0
        stats.decode_rows = len(so.decode_seqs)
        stats.prefill_tokens = self._prefill_tokens(so)
        stats.preemptions = len(so.preempted)
        stats.prefix_hit_tokens = sum(h for h, _ in so.lookups)
        stats.prefix_lookup_tokens = sum(t for _, t in so.lookups)
        stats.waiting = sched.num_waiting
        stats.running = sched.num_running
        stats.pages_used = sched.kv.num_used
        stats.pages_free = sched.kv.num_free
        stats.num_slots = sched.num_slots

    @staticmethod
    def _prefill_tokens(so: SchedulerOutput) -> int:
        if not so.prefill_seqs:
            return 0
        return so.num_batched_tokens - sum(int(k) for k in so.decode_rows_steps)

    def _dispatch(self, so: SchedulerOutput) -> tuple:
        runner = self.runner
        out_d = out_p = None
        if so.decode_seqs and so.spec_k:
            out_d = runner.speculate(so.decode_inputs, k=so.spec_k, full=so.decode_full)
            out_d.copy_to_host_async()
        elif so.decode_seqs:
            out_d = runner.decode(so.decode_inputs, num_steps=so.num_steps, full=so.decode_full)
            out_d.copy_to_host_async()
        if so.prefill_seqs:
            out_p = runner.prefill(so.prefill_inputs, chunk=so.prefill_shape[1])
            out_p.copy_to_host_async()
        return so, out_d, out_p

    def _apply(self, so: SchedulerOutput, dec: np.ndarray | None, pre: np.ndarray | None,
               outputs: list[SampleOutput], stats: StepStats | None = None) -> int:
        """Apply a step's results; returns the number of tokens applied."""
        d_tok = dec[..., 0] if dec is not None else np.zeros((0, 0), np.int32)
        p_tok = pre[:, 0] if pre is not None else np.zeros(0, np.int32)
        spec_stats = None
        if so.spec_k and dec is not None:
            spec_stats = self._spec_stats(so, d_tok[-1], stats)
            d_tok = d_tok[:-1]
        applied = 0
        for ev in self.scheduler.update_from_output(so, d_tok, p_tok, spec_stats):
            seq = ev.seq
            entry: _Entry = seq.tag
            n = len(ev.tokens)
            applied += n
            lp = None
            if entry.request.logprobs and n:
                lp = pre[ev.row: ev.row + 1] if ev.is_prefill else dec[:n, ev.row]
            out = SampleOutput(entry.request.request_id, seq.index, ev.tokens, logprobs=lp,
                               finish_reason=ev.finish_reason,
                               cached_tokens=max(seq.num_cached_tokens, 0),
                               scheduled_time=seq.first_scheduled)
            if ev.finish_reason == "error":
                out.error = "the device stopped the sequence without a stop condition"
            outputs.append(out)
            if ev.finish_reason is not None:
                self._done(seq, None, ev.finish_reason)
        return applied

    def _spec_stats(self, so: SchedulerOutput, packed: np.ndarray,
                    step_stats: StepStats | None) -> np.ndarray:
        """(proposed, kept) drafts per decode row of a speculative step, counted into
        `spec_counts` and `step_stats` (`steps.SPEC_PACK` packs them on device)."""
        from jaxinfer.steps import SPEC_PACK

        n = len(so.decode_seqs)
        packed = packed[:n].astype(np.int64)
        stats = np.stack([packed % SPEC_PACK, packed // SPEC_PACK], axis=1)
        c = self.spec_counts
        proposed = stats[:, 0]
        c["num_drafts"] += int(np.count_nonzero(proposed))
        c["num_draft_tokens"] += int(proposed.sum())
        c["num_accepted_tokens"] += int(stats[:, 1].sum())
        for i in range(len(c["accepted_per_pos"])):
            kept_i = int(np.count_nonzero(stats[:, 1] > i))
            c["accepted_per_pos"][i] += kept_i
            if step_stats is not None:
                setattr(step_stats, f"spec_accepted_pos_{i}", kept_i)
        if step_stats is not None:
            step_stats.spec_num_drafts = int(np.count_nonzero(proposed))
            step_stats.spec_num_draft_tokens = int(proposed.sum())
            step_stats.spec_num_accepted_tokens = int(stats[:, 1].sum())
        if self.spec_by_sample is not None:
            for seq, (proposed, kept) in zip(so.decode_seqs, stats.tolist()):
                key = (seq.request.request_id, seq.index)
                row = self.spec_by_sample.setdefault(key, [0, 0, 0])
                row[0] += proposed > 0
                row[1] += proposed
                row[2] += kept
        return stats

    def pop_spec_stats(self, request_id: str, index: int) -> dict | None:
        """A finished sample's speculative counters (None when speculation is off or
        per-sample counting, `spec_by_sample`, is not on)."""
        if self.spec is None or self.spec_by_sample is None:
            return None
        d, n, m = self.spec_by_sample.pop((request_id, index), [0, 0, 0])
        return {"num_drafts": d, "num_draft_tokens": n, "num_accepted_tokens": m}

    def _done(self, seq: Sequence, outputs: list[SampleOutput] | None, reason: FinishReason,
              error: str | None = None) -> None:
        """Book a finished sequence; with `outputs`, report it (no token)."""
        entry: _Entry = seq.tag
        if outputs is not None:
            outputs.append(SampleOutput(entry.request.request_id, seq.index, [],
                                        finish_reason=reason, error=error,
                                        cached_tokens=max(seq.num_cached_tokens, 0),
                                        scheduled_time=seq.first_scheduled))
        entry.unfinished -= 1
        if entry.unfinished == 0:
            self._entries.pop(entry.request.request_id, None)

    def _device_failure(self, exc: BaseException, outputs: list[SampleOutput]) -> None:
        """A device step failed: its sequences' cache contents are unknown. Fail every running
        sequence, start from a fresh cache and slot state and an empty prefix cache."""
        logger.error("device step failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        message = f"device step failed: {type(exc).__name__}: {exc}"
        failed = {id(seq.tag): seq.tag for seq in self.scheduler.running}
        for entry in failed.values():  # whole requests: waiting samples of n > 1 too
            for seq in entry.seqs:
                if self.scheduler.finish(seq, "error"):
                    self._done(seq, outputs, "error", message)
        self.scheduler.kv.reset_prefix_cache()
        self.runner.init_state()

    def drain_pending(self) -> list[SampleOutput]:
        """Read and apply the step in flight, dispatching nothing new (shutdown, tests)."""
        outputs: list[SampleOutput] = []
        if self._pending is not None:
            done, self._pending = self._pending, None
            results = self._read(done, outputs)
            if results is not None:
                self._apply(done[0], *results, outputs)
        return outputs

    def _read(self, done: tuple, outputs: list[SampleOutput]) -> tuple | None:
        """A dispatched step's outputs on the host (decode, prefill), or None when the step
        failed on the device (its sequences are then failed and the state reset)."""
        try:
            return tuple(None if x is None else np.asarray(x) for x in done[1:])
        except Exception as e:
            self.scheduler.discard(done[0])
            self._device_failure(e, outputs)
            return None

    def _late_compile(self, key: tuple, seconds: float) -> None:
        self.num_recompiles += 1
        logger.warning("compiled %s after warm-up (%.2fs): a shape outside the warm-up set",
                       key, seconds)



def resolve_engine_config(cfg: ModelConfig, engine_cfg: EngineConfig, mesh, *,
                          extra_page_bytes: int = 0) -> EngineConfig:
    """`engine_cfg` with the kernels resolved for this backend and, when `num_pages` is None,
    the KV pool sized from free device memory (`jaxinfer.kv_cache.size_pool`; in a multi-host
    run the smallest of every process's size, so all build the same programs). Logs the
    result: pages, tokens, memory, max sequences and context."""
    import jax

    eng = dataclasses.replace(engine_cfg,
                              kernels=engine_cfg.resolved_kernels(jax.default_backend()))
    how = "--num-pages"
    if eng.num_pages is None:
        slot_bytes = (eng.num_slots + 1) * cfg.vocab_size * 5
        activations = eng.max_num_batched_tokens * (12 * cfg.hidden_size
                                                    + 3 * cfg.intermediate_size) * 4
        reserved = 2**30 + slot_bytes + activations + 8 * max(eng.prefill_rows) * cfg.vocab_size
        if eng.speculative is not None:  # the slots' token history, the verify logits
            reserved += (eng.num_slots + 1) * eng.max_seq_len * 4 + (
                eng.num_slots * 8 * cfg.vocab_size * 4 * 3)
        pages = size_pool(cfg, eng, mesh, reserved_bytes=reserved,
                          extra_page_bytes=extra_page_bytes)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            pages = int(multihost_utils.process_allgather(np.asarray([pages], np.int64)).min())
        eng = dataclasses.replace(eng, num_pages=pages)
        how = (f"gpu_memory_utilization {eng.gpu_memory_utilization}"
               if memory_stats(next(iter(mesh.devices.flat))) else "every slot at max_seq_len")
        if pages == max_pages(cfg, eng):
            how += ", capped at 2**31 bytes per layer and KV head: the kernels' int32 offsets"
    elif eng.num_pages > max_pages(cfg, eng):
        raise ConfigError(
            f"--num-pages {eng.num_pages} is more than the {max_pages(cfg, eng)} pages "
            f"the GPU kernels can address (one layer's and head's pages must stay under 2**31 "
            "bytes); give fewer")
    pages = eng.pool_pages
    logger.info("KV cache: %d pages of %d tokens = %d tokens, %.2f GiB per device (%s); "
                "max sequences %d, max context %d tokens; kernels %s", pages, eng.page_size,
                pages * eng.page_size, pages * page_bytes(cfg, eng, mesh) / 2**30, how,
                eng.num_slots, min(eng.max_seq_len, cfg.context_limit), eng.kernels)
    return eng
