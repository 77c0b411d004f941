"""Continuous-batching scheduler: plain Python and numpy, no JAX (STYLE.md rule 10).

After vLLM v1's scheduler, there is no prefill phase and no decode phase. Every sequence has
`num_tokens` (prompt plus generated tokens known on the host), `num_pending` (tokens sampled by
dispatched steps whose values the host has not read yet) and `num_computed` (tokens whose keys
and values dispatched steps write). Each `schedule()` call fills a token budget
(`EngineConfig.max_num_batched_tokens`) in three passes:

1. decode: every running sequence whose known tokens are all computed feeds its one pending
   token. The token itself never visits the host: the device keeps it in the sequence's slot
   (`jaxinfer.runner.SlotState`), so step n+1 can be dispatched before step n is read;
2. prefill chunks of running sequences that are part-way through their prompt;
3. admission of waiting sequences (priority, then arrival), each with a prefill chunk that
   starts after its prefix-cache hit.

A long prompt therefore advances one chunk per step beside the decodes (chunked prefill), never
stalling them. Every step's shapes come from `jaxinfer.buckets` (rows, chunk length, block-table
width), so the device only runs programs compiled at warm-up.

Pages. `serve/kv_pages.py` owns them. When a running sequence needs a page and none is free,
the lowest-priority, latest-arriving running sequence not yet scheduled in this step is
preempted by recompute: its pages are freed (its full blocks stay in the prefix cache while
not evicted) and it returns to the waiting queue ahead of later arrivals. When it is admitted
again it recomputes prompt + generated tokens (minus cache hits) and samples the next token,
so its output continues exactly. A sequence is admitted again only once no dispatched step
still carries it (`inflight == 0`), so the host then knows all of its tokens.

Stops detected here: EOS (unless `ignore_eos`), stop token ids, `max_tokens`, the context
limit, and deadlines. Stop strings need text and are found by the engine's output thread,
which calls `finish`. Because results are read one step late, a sequence that sampled EOS in
step n is still part of step n+1; that extra token is discarded (as JetStream does).

n > 1 samples: sample i is its own sequence (seed + i). Samples 1.. wait until sample 0 has
scheduled its whole prompt, then hit its full prompt blocks in the prefix cache and recompute
only the last partial block, so the prompt's pages are shared copy-free.

Sequences using repetition/presence/frequency penalties skip prefix hits: the device builds
their prompt-token mask from the prompt chunks it is fed.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import logging
import time
from typing import NamedTuple

import numpy as np

from jaxinfer import buckets
from jaxinfer.config import EngineConfig
from jaxinfer.sampling import row_keys
from serve.kv_pages import KVPages
from serve.types import FinishReason, Request

logger = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
NUM_FLOAT_PARAMS = 6  # temperature, top_p, min_p, repetition, presence, frequency penalty
NUM_INT_PARAMS = 4  # top_k, key word 0, key word 1, wants logprobs


class Sequence:
    """One sample of one request, as the scheduler tracks it."""

    __slots__ = (
        "deadline",
        "finish_reason",
        "float_params",
        "ignore_eos",
        "index",
        "inflight",
        "int_params",
        "max_len",
        "needs_full_sampler",
        "num_cached_tokens",
        "num_computed",
        "num_pending",
        "num_preemptions",
        "num_tokens",
        "order",
        "parent",
        "prompt_done_step",
        "prompt_len",
        "request",
        "scheduled_step",
        "seq_id",
        "slot",
        "status",
        "stop_ids",
        "tag",
        "tokens",
        "uses_penalties",
    )

    def __init__(self, seq_id: int, request: Request, index: int, *, seed: int,
                 parent: Sequence | None) -> None:
        s = request.sampling
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.prompt_len = len(request.prompt_ids)
        self.max_len = self.prompt_len + request.max_tokens
        self.tokens = np.zeros(self.max_len, np.int32)
        self.tokens[: self.prompt_len] = request.prompt_ids
        self.num_tokens = self.prompt_len  # known on the host
        self.num_pending = 0  # sampled by dispatched steps, not read yet
        self.num_computed = 0  # written to the cache by dispatched steps
        self.inflight = 0  # dispatched steps that carry this sequence and are not applied yet
        self.status = WAITING
        self.slot = -1
        self.order = (request.priority, request.arrival, seq_id)  # lower runs first
        self.stop_ids = frozenset(request.stop_token_ids)
        self.ignore_eos = request.ignore_eos
        self.finish_reason: FinishReason | None = None
        self.num_cached_tokens = -1  # prefix-cache hit at the first admission
        self.num_preemptions = 0
        self.scheduled_step = -1
        self.parent = parent
        self.prompt_done_step = -1  # step in which the whole prompt was first scheduled
        self.uses_penalties = (s.repetition_penalty != 1 or s.presence_penalty != 0
                               or s.frequency_penalty != 0)
        # Greedy rows without penalties or logprobs decode with the cheap argmax sampler.
        self.needs_full_sampler = (s.temperature > 0 or self.uses_penalties
                                   or request.logprobs > 0)
        self.float_params = np.array(
            [s.temperature, s.top_p, s.min_p, s.repetition_penalty, s.presence_penalty,
             s.frequency_penalty], np.float32)
        key = row_keys([seed]).view(np.int32)[0]
        self.int_params = np.array([s.top_k, key[0], key[1], int(request.logprobs > 0)], np.int32)
        self.deadline = request.deadline
        self.tag: object = None  # the engine's per-sample bookkeeping

    @property
    def num_generated(self) -> int:
        """Generated tokens known on the host."""
        return self.num_tokens - self.prompt_len

    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len: self.num_tokens].tolist()

    def can_sample(self) -> bool:
        """Whether another token may be sampled (max_tokens and the context limit)."""
        return self.num_tokens + self.num_pending < self.max_len

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, {self.status}, "
                f"tokens={self.num_tokens}+{self.num_pending}, computed={self.num_computed})")


class TokenEvent(NamedTuple):
    """A token applied to a sequence; `is_prefill`/`row` locate it in the step's outputs."""

    seq: Sequence
    token: int
    finish_reason: FinishReason | None
    is_prefill: bool
    row: int


@dataclasses.dataclass
class SchedulerOutput:
    """One engine step: a decode call and a prefill call, at compiled (bucketed) shapes.
    Padding rows point at the scratch slot, with position -1 (decode) or length 0 (prefill)."""

    step: int
    decode_seqs: list[Sequence]
    decode_slots: np.ndarray  # [B] int32 slot whose last token is fed
    decode_positions: np.ndarray  # [B] int32 position of that token (-1: padding row)
    decode_block_tables: np.ndarray  # [B, W] int32
    decode_full: bool  # some decode row samples, is penalized or wants logprobs
    prefill_seqs: list[Sequence]
    prefill_tokens: np.ndarray  # [R, T] int32 chunk tokens (0 past the length)
    prefill_starts: np.ndarray  # [R] int32 position of the first chunk token
    prefill_lens: np.ndarray  # [R] int32 chunk length (0: padding row)
    prefill_slots: np.ndarray  # [R] int32
    prefill_block_tables: np.ndarray  # [R, W_full] int32
    prefill_sample: np.ndarray  # [R] bool: the chunk ends the known tokens; sample the next one
    prefill_prompt_lens: np.ndarray  # [R] int32 (penalties count later positions as output)
    prefill_float_params: np.ndarray  # [R, 6] float32, see NUM_FLOAT_PARAMS
    prefill_int_params: np.ndarray  # [R, 4] int32, see NUM_INT_PARAMS
    num_batched_tokens: int
    preempted: list[Sequence]
    finished: list[Sequence]  # finished by the scheduler itself this step (deadlines)
    lookups: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # admissions:
    # (prefix-cache hit tokens, tokens looked up)

    @property
    def has_work(self) -> bool:
        return bool(self.decode_seqs or self.prefill_seqs)


class Scheduler:
    """Waiting and running queues, the token budget, preemption and stop conditions.

    Args:
        engine: the engine config (budget, buckets, page geometry).
        eos_ids: the model's EOS ids.
        enable_prefix_cache: share full prompt blocks between sequences.
    """

    def __init__(self, engine: EngineConfig, *, eos_ids: tuple[int, ...] = (),
                 enable_prefix_cache: bool = True) -> None:
        self.cfg = engine
        self.eos_ids = frozenset(eos_ids)
        self.kv = KVPages(engine.num_pages, engine.page_size,
                          enable_prefix_cache=enable_prefix_cache)
        self.num_slots = buckets.serve_num_slots(engine)
        self.scratch_slot = self.num_slots
        self.max_width = max(buckets.serve_page_widths(engine))
        # Host copy of every slot's block table; row `scratch_slot` stays zero (padding rows).
        self.block_tables = np.zeros((self.num_slots + 1, self.max_width), np.int32)
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self.waiting: list[Sequence] = []  # sorted by Sequence.order
        self.running: list[Sequence] = []  # sorted by Sequence.order
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._ids = itertools.count()
        self.step_id = 0
        self.num_preemptions = 0

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request: Request, *, seed: int) -> list[Sequence]:
        """Queue the request's n samples (sample i uses seed + i); returns them."""
        seqs: list[Sequence] = []
        for i in range(request.n):
            seq = Sequence(next(self._ids), request, i, seed=seed + i,
                           parent=seqs[0] if seqs else None)
            seqs.append(seq)
            bisect.insort(self.waiting, seq, key=_order)
            if seq.deadline is not None:
                heapq.heappush(self._deadlines, (seq.deadline, seq.seq_id, seq))
        return seqs

    def finish(self, seq: Sequence, reason: FinishReason) -> bool:
        """Finish a sequence from outside (cancel, stop string, error); frees its pages and
        slot at once. Returns False when it had already finished."""
        if seq.status == FINISHED:
            return False
        self._finish(seq, reason)
        return True

    def abort_all(self, reason: FinishReason) -> list[Sequence]:
        """Finish every unfinished sequence; returns them."""
        seqs = self.running + self.waiting
        for seq in seqs:
            self._finish(seq, reason)
        return seqs

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ----------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """Choose this step's decode rows and prefill chunks under the token budget."""
        self.step_id += 1
        step = self.step_id
        finished = self._expire(time.monotonic() if now is None else now)
        cfg = self.cfg
        budget = cfg.max_num_batched_tokens
        decode: list[Sequence] = []
        chunks: list[tuple[Sequence, int, int]] = []  # (seq, start, length)
        preempted: list[Sequence] = []
        lookups: list[tuple[int, int]] = []

        # 1. decodes, highest priority first; a missing page preempts from the back.
        for seq in list(self.running):
            if (seq.status != RUNNING or seq.num_computed < seq.num_tokens
                    or not seq.can_sample()):
                continue
            if not self._reserve(seq, seq.num_computed + 1, step, preempted, self_ok=True):
                continue
            decode.append(seq)
            seq.scheduled_step = step
            budget -= 1

        # 2. prefill chunks of running sequences part-way through their known tokens.
        for seq in list(self.running):
            if (seq.status != RUNNING or seq.scheduled_step == step
                    or seq.num_computed >= seq.num_tokens):
                continue
            n = self._chunk_len(seq.num_tokens - seq.num_computed, chunks, budget)
            if n == 0:
                break
            if not self._reserve(seq, seq.num_computed + n, step, preempted, self_ok=False):
                continue
            chunks.append((seq, seq.num_computed, n))
            seq.scheduled_step = step
            budget -= n

        # 3. admissions; none in a step that had to preempt (the pool is short).
        if not preempted:
            admitted = []
            for seq in self.waiting:
                if seq.inflight or (seq.parent is not None and (
                        seq.parent.prompt_done_step < 0 or seq.parent.prompt_done_step == step)):
                    continue
                if not self._free_slots or budget <= 0:
                    break
                hit = ([], []) if seq.uses_penalties else self.kv.lookup(seq.tokens, seq.num_tokens)
                start = len(hit[0]) * cfg.page_size
                n = self._chunk_len(seq.num_tokens - start, chunks, budget)
                if n == 0:
                    break
                fresh = self.kv.allocate(seq.seq_id, start + n, hit=hit)
                if fresh is None:
                    break
                if seq.num_cached_tokens < 0:
                    seq.num_cached_tokens = start
                self.kv.record_lookup(start, seq.num_tokens)
                lookups.append((start, seq.num_tokens))
                seq.slot = self._free_slots.pop()
                pages = self.kv.pages(seq.seq_id)
                self.block_tables[seq.slot, : len(pages)] = pages
                seq.status = RUNNING
                seq.num_computed = start
                bisect.insort(self.running, seq, key=_order)
                admitted.append(seq)
                chunks.append((seq, start, n))
                seq.scheduled_step = step
                budget -= n
            if admitted:
                gone = set(map(id, admitted))
                self.waiting = [s for s in self.waiting if id(s) not in gone]

        # Book the work, then register full blocks (after all admissions, so no sequence
        # shares a page that is only written later in this same step).
        for seq in decode:
            seq.num_computed += 1
            seq.num_pending += 1
            seq.inflight += 1
        samples = []
        for seq, start, n in chunks:
            seq.num_computed = start + n
            sample = seq.num_computed == seq.num_tokens and seq.can_sample()
            if sample:
                seq.num_pending += 1
            samples.append(sample)
            seq.inflight += 1
            if seq.index == 0 and seq.prompt_done_step < 0 and seq.num_computed >= seq.prompt_len:
                seq.prompt_done_step = step
        for seq in decode:
            self.kv.register(seq.seq_id, seq.tokens, min(seq.num_computed, seq.num_tokens))
        for seq, _, _ in chunks:
            self.kv.register(seq.seq_id, seq.tokens, min(seq.num_computed, seq.num_tokens))
        self.num_preemptions += len(preempted)
        out = self._build(step, decode, chunks, samples, preempted, finished,
                          cfg.max_num_batched_tokens - budget)
        out.lookups = lookups
        return out

    def _chunk_len(self, remaining: int, chunks: list, budget: int) -> int:
        """Tokens the next prefill row may take: within the budget and a compiled shape."""
        limit = buckets.serve_max_chunk(self.cfg, len(chunks) + 1)
        if any(n > limit for _, _, n in chunks):
            return 0
        return max(min(remaining, budget, limit), 0)

    def _reserve(self, seq: Sequence, num_tokens: int, step: int, preempted: list[Sequence],
                 *, self_ok: bool) -> bool:
        """Give `seq` pages for `num_tokens` positions, preempting lower-priority running
        sequences not scheduled in this step. With `self_ok`, preempt `seq` itself when no
        victim is left; returns False when `seq` does not run in this step."""
        while True:
            old = len(self.kv.pages(seq.seq_id))
            fresh = self.kv.allocate(seq.seq_id, num_tokens)
            if fresh is not None:
                if fresh:
                    self.block_tables[seq.slot, old: old + len(fresh)] = fresh
                return True
            victim = next((s for s in reversed(self.running)
                           if s is not seq and s.scheduled_step != step), None)
            if victim is not None and victim.order < seq.order:
                victim = None  # never preempt a higher-priority sequence
            if victim is None:
                if self_ok:
                    self._preempt(seq)
                    preempted.append(seq)
                return False
            self._preempt(victim)
            preempted.append(victim)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %r", seq)
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        self._free_slots.append(seq.slot)
        seq.slot = -1
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def _expire(self, now: float) -> list[Sequence]:
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, seq = heapq.heappop(self._deadlines)
            if seq.status != FINISHED:
                self._finish(seq, "deadline")
                out.append(seq)
        return out

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status == RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.seq_id)
            self._free_slots.append(seq.slot)
            seq.slot = -1
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        seq.status = FINISHED
        seq.finish_reason = reason

    def _build(self, step, decode, chunks, samples, preempted, finished, used
               ) -> SchedulerOutput:
        cfg = self.cfg
        nd = len(decode)
        if nd:
            pos = np.fromiter((s.num_computed - 1 for s in decode), np.int32, nd)
            b, w = buckets.serve_decode_shape(cfg, nd, int(pos.max()) // cfg.page_size + 1)
        else:
            pos, (b, w) = np.zeros(0, np.int32), (0, 0)
        d_slots = np.full(b, self.scratch_slot, np.int32)
        d_slots[:nd] = [s.slot for s in decode]
        d_pos = np.full(b, -1, np.int32)
        d_pos[:nd] = pos
        nr = len(chunks)
        if nr:
            r, t = buckets.serve_prefill_shape(cfg, nr, max(n for _, _, n in chunks))
        else:
            r, t = 0, 0
        p_tokens = np.zeros((r, t), np.int32)
        p_starts = np.zeros(r, np.int32)
        p_lens = np.zeros(r, np.int32)
        p_slots = np.full(r, self.scratch_slot, np.int32)
        p_sample = np.zeros(r, bool)
        p_prompt = np.zeros(r, np.int32)
        p_float = np.zeros((r, NUM_FLOAT_PARAMS), np.float32)
        p_float[:, 1] = 1.0  # padding rows: top_p 1, repetition penalty 1
        p_float[:, 3] = 1.0
        p_int = np.zeros((r, NUM_INT_PARAMS), np.int32)
        for i, (seq, start, n) in enumerate(chunks):
            p_tokens[i, :n] = seq.tokens[start: start + n]
            p_starts[i] = start
            p_lens[i] = n
            p_slots[i] = seq.slot
            p_sample[i] = samples[i]
            p_prompt[i] = seq.prompt_len
            p_float[i] = seq.float_params
            p_int[i] = seq.int_params
        return SchedulerOutput(
            step=step, decode_seqs=decode, decode_slots=d_slots, decode_positions=d_pos,
            decode_block_tables=self.block_tables[d_slots, :w],
            decode_full=any(s.needs_full_sampler for s in decode),
            prefill_seqs=[c[0] for c in chunks], prefill_tokens=p_tokens,
            prefill_starts=p_starts, prefill_lens=p_lens, prefill_slots=p_slots,
            prefill_block_tables=self.block_tables[p_slots], prefill_sample=p_sample,
            prefill_prompt_lens=p_prompt, prefill_float_params=p_float,
            prefill_int_params=p_int, num_batched_tokens=used, preempted=preempted,
            finished=finished)

    # -- results -------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, decode_tokens: np.ndarray,
                           prefill_tokens: np.ndarray) -> list[TokenEvent]:
        """Apply a step's sampled tokens (decode [>= B], prefill [>= R]); returns a
        TokenEvent for every sequence that got a token and was still unfinished. Finished
        sequences release their pages and slot here."""
        events = []
        for i, seq in enumerate(out.decode_seqs):
            seq.inflight -= 1
            if seq.status != FINISHED:
                events.append(self._append(seq, int(decode_tokens[i]), False, i))
        for i, seq in enumerate(out.prefill_seqs):
            seq.inflight -= 1
            if out.prefill_sample[i] and seq.status != FINISHED:
                events.append(self._append(seq, int(prefill_tokens[i]), True, i))
        return events

    def discard(self, out: SchedulerOutput) -> None:
        """Forget a step whose results will never come (its dispatch failed)."""
        for seq in itertools.chain(out.decode_seqs, out.prefill_seqs):
            seq.inflight -= 1
        for seq, sample in zip(out.prefill_seqs, out.prefill_sample):
            if sample:
                seq.num_pending -= 1
        for seq in out.decode_seqs:
            seq.num_pending -= 1

    def _append(self, seq: Sequence, token: int, is_prefill: bool, row: int) -> TokenEvent:
        seq.num_pending -= 1
        seq.tokens[seq.num_tokens] = token
        seq.num_tokens += 1
        reason: FinishReason | None = None
        if (token in self.eos_ids and not seq.ignore_eos) or token in seq.stop_ids:
            reason = "stop"
        elif seq.num_tokens >= seq.max_len:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
        elif seq.status == RUNNING:
            self.kv.register(seq.seq_id, seq.tokens, min(seq.num_computed, seq.num_tokens))
        return TokenEvent(seq, token, reason, is_prefill, row)

    # -- introspection -------------------------------------------------------------------
    def stats(self) -> dict:
        kv = self.kv
        return {"waiting": len(self.waiting), "running": len(self.running),
                "pages_used": kv.num_used, "pages_free": kv.num_free,
                "pages_cached": kv.num_cached, "prefix_hit_rate": kv.hit_rate(),
                "prefix_hit_tokens": kv.hit_tokens, "prefix_lookup_tokens": kv.lookup_tokens,
                "preemptions": self.num_preemptions, "steps": self.step_id}

    def check(self) -> None:
        """Raise AssertionError on inconsistent bookkeeping (tests call this)."""
        self.kv.check()
        held = {s.slot for s in self.running}
        if len(held) != len(self.running) or held & set(self._free_slots):
            raise AssertionError("slot accounting is inconsistent")
        if len(held) + len(self._free_slots) != self.num_slots:
            raise AssertionError("a slot leaked")
        for s in self.running:
            if s.status != RUNNING:
                raise AssertionError(f"{s} in running")
        for s in self.waiting:
            if s.status != WAITING or self.kv.pages(s.seq_id):
                raise AssertionError(f"{s} in waiting holds pages or has the wrong status")


def _order(seq: Sequence) -> tuple:
    return seq.order
