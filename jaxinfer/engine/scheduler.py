"""Continuous-batching scheduler: plain Python and numpy, no JAX (STYLE.md rule 10).

After vLLM v1's scheduler, there is no prefill phase and no decode phase. Every sequence has
`num_tokens` (prompt plus generated tokens known on the host), `num_pending` (tokens sampled by
dispatched steps whose values the host has not read yet) and `num_computed` (tokens whose keys
and values dispatched steps write). Each `schedule()` call fills a token budget
(`EngineConfig.max_num_batched_tokens`) in three passes:

1. decode: every running sequence whose known tokens are all computed feeds its pending token.
   The token itself never visits the host: the device keeps it in the sequence's slot
   (`jaxinfer.steps.SlotState`), so step n+1 can be dispatched before step n is read;
2. prefill chunks of running sequences that are part-way through their known tokens;
3. admission of waiting sequences (priority, then arrival), each with a prefill chunk that
   starts after its prefix-cache hit.

A long prompt therefore advances one chunk per step beside the decodes (chunked prefill), never
stalling them. Every step's shapes come from `jaxinfer.buckets` (rows, chunk length, block-table
width), so the device only runs programs compiled at warm-up.

Multi-step decoding. When no prefill chunk can join the step (nothing part-way through its
prompt, and no waiting sequence that could be admitted now), the decode rows run
`EngineConfig.decode_steps` tokens in one dispatch, and the device stops each row on its own
at EOS, a stop id, max_tokens or the context limit (each row may sample at most
`max_len - num_tokens - num_pending` more tokens). A row that keeps running therefore produces
exactly its planned tokens, so the host knows every running row's position without reading
the step; a row that stopped early has finished, which the host learns one step late.

Pages. `jaxinfer.engine.kv_pages` owns them (the engine's one allocator). When a running
sequence needs a page and none is free, the lowest-priority, latest-arriving running sequence
not yet scheduled in this step is preempted by recompute: its pages are freed (its full blocks
stay in the prefix cache while not evicted) and it returns to the waiting queue ahead of later
arrivals. When it is admitted again it recomputes prompt + generated tokens (minus cache hits)
and samples the next token, so its output continues exactly. A sequence is admitted again only
once no dispatched step still carries it (`inflight == 0`), so the host then knows all of its
tokens.

Stops detected here, and on the device in the same way: EOS (unless `ignore_eos`), stop token
ids, `max_tokens`, the context limit; deadlines only here. Stop strings need text and are found
by the output processor, which calls `finish`. Because results are read one step late, a
sequence that stopped in step n may still be part of step n+1; the device has marked its slot
inactive, so that step writes nothing for it and returns no token.

n > 1 samples: sample i is its own sequence (seed + i). Samples 1.. wait until sample 0 has
scheduled its whole prompt, then hit its full prompt blocks in the prefix cache and recompute
only the last partial block, so the prompt's pages are shared copy-free.

Sequences using repetition/presence/frequency penalties skip prefix hits: the device builds
their prompt-token mask from the prompt chunks it is fed.

Speculative decoding (`SpecPlan`). A step's decode rows all run one speculative tier k (0 is
plain decoding): each feeds its last token and up to k drafts (1 + k tokens of the budget,
vLLM's `num_tokens_with_spec`) and emits between 1 and k + 1 tokens, a count only the device
knows when the next step is dispatched. The host therefore books the most a row can emit
(`num_computed` and `num_pending` grow by k + 1, pages are reserved for every position the
step may write) and gives back the difference when it reads the step. KV written at rejected
positions is overwritten when the sequence reaches them, and only blocks of tokens known on the
host (verified) enter the prefix cache. With `adaptive`, k is chosen per step to maximise
expected tokens per second: each tier's measured step cost at the step's batch bucket against
the tokens the running rows' acceptance estimates predict (`jaxinfer/engine/spec_plan.py`).
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
from jaxinfer.engine import packing
from jaxinfer.engine.kv_pages import KVPages
from jaxinfer.engine.request import FinishReason, Request
from jaxinfer.engine.spec_plan import RELAX, ROW_DECAY, SpecPlan

logger = logging.getLogger(__name__)

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"

class Sequence:
    """One sample of one request, as the scheduler tracks it."""

    __slots__ = (
        "deadline",
        "draft_lag",
        "finish_reason",
        "first_scheduled",
        "float_params",
        "ignore_eos",
        "index",
        "inflight",
        "int_params",
        "live",
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
        "spec_inflight",
        "spec_kept",
        "spec_rejected",
        "status",
        "stop_ids",
        "stop_row",
        "tag",
        "tokens",
        "uses_penalties",
    )

    def __init__(self, seq_id: int, request: Request, index: int, *, seed: int,
                 parent: Sequence | None, num_stop: int) -> None:
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
        self.stop_row = np.full(num_stop, -1, np.int32)
        self.stop_row[: len(request.stop_token_ids)] = request.stop_token_ids
        self.ignore_eos = request.ignore_eos
        self.finish_reason: FinishReason | None = None
        self.num_cached_tokens = -1  # prefix-cache hit at the first admission
        self.first_scheduled: float | None = None  # time.monotonic() of the first admission
        self.num_preemptions = 0
        self.scheduled_step = -1
        self.parent = parent
        self.prompt_done_step = -1  # step in which the whole prompt was first scheduled
        self.uses_penalties = s.uses_penalties
        self.float_params, self.int_params = packing.sampling_row(
            temperature=s.temperature, top_p=s.top_p, min_p=s.min_p,
            repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, top_k=s.top_k, seed=seed,
            logprobs=request.logprobs, ignore_eos=request.ignore_eos)
        # Greedy rows without penalties or logprobs decode with the cheap argmax sampler.
        self.needs_full_sampler = packing.needs_full_sampler(self.float_params, self.int_params)
        self.deadline = request.deadline
        self.tag: object = None  # the engine core's per-request bookkeeping
        self.spec_kept = self.spec_rejected = 0.0  # its own decayed draft outcomes
        self.draft_lag = 0  # known tokens a proposer's own cache has not seen (`catch_up`)
        self.spec_inflight = 0  # dispatched speculative steps not read yet (upper bounds)
        self.live = False  # its device slot holds its last token (a sampling step was booked)

    @property
    def num_generated(self) -> int:
        """Generated tokens known on the host."""
        return self.num_tokens - self.prompt_len

    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len: self.num_tokens].tolist()

    def can_sample(self) -> bool:
        """Whether another token may be sampled (max_tokens and the context limit)."""
        return self.num_tokens + self.num_pending < self.max_len

    def room(self) -> int:
        """Tokens the sequence may still sample beyond those known or pending."""
        return self.max_len - self.num_tokens - self.num_pending

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, {self.status}, "
                f"tokens={self.num_tokens}+{self.num_pending}, computed={self.num_computed})")


class TokenEvent(NamedTuple):
    """Tokens applied to a sequence by one step, in order; `is_prefill` and `row` locate them
    in the step's outputs (prefill [R, ...], or decode [steps, B, ...] from step 0)."""

    seq: Sequence
    tokens: list[int]
    finish_reason: FinishReason | None
    is_prefill: bool
    row: int


@dataclasses.dataclass
class SchedulerOutput:
    """One engine step: a decode call of `num_steps` tokens per row and a prefill call, at
    compiled (bucketed) shapes, their inputs packed as `jaxinfer.engine.packing` lays them out.
    Padding rows point at the scratch slot (decode) or have length 0 (prefill)."""

    step: int
    decode_seqs: list[Sequence]
    decode_inputs: np.ndarray  # [B, 1 + W] int32: slot | block table
    decode_rows_steps: np.ndarray  # [len(decode_seqs)] tokens each row may sample here (the
    # most it may emit, for speculative rows)
    num_steps: int  # decode tokens per row in this dispatch (1 or decode_steps; 1 + spec_k)
    decode_full: bool  # some decode row samples, is penalized or wants logprobs
    prefill_seqs: list[Sequence]
    prefill_inputs: np.ndarray  # [R, row width] int32 (packing.PrefillLayout)
    prefill_sample: np.ndarray  # [len(prefill_seqs)] bool: the chunk ends the known tokens
    prefill_lens: np.ndarray  # [len(prefill_seqs)] int32 chunk lengths
    prefill_shape: tuple[int, int]  # (R, T); (0, 0) without prefill
    num_batched_tokens: int
    preempted: list[Sequence]
    finished: list[Sequence]  # finished by the scheduler itself this step (deadlines)
    lookups: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # admissions:
    # (prefix-cache hit tokens, tokens looked up)
    spec_k: int = 0  # speculative depth of the decode rows (0: plain decode)

    @property
    def has_work(self) -> bool:
        return bool(self.decode_seqs or self.prefill_seqs)

    @property
    def decode_shape(self) -> tuple[int, int]:
        """(B, W) of the decode call; (0, 0) without decode rows."""
        if not self.decode_seqs:
            return 0, 0
        return self.decode_inputs.shape[0], self.decode_inputs.shape[1] - 1


class Scheduler:
    """Waiting and running queues, the token budget, preemption and stop conditions.

    Args:
        engine: the engine config (budget, buckets, page geometry), `num_pages` resolved.
        eos_ids: the model's EOS ids.
    """

    def __init__(self, engine: EngineConfig, *, eos_ids: tuple[int, ...] = (),
                 spec: SpecPlan | None = None) -> None:
        self.cfg = engine
        self.spec = spec
        self.eos_ids = frozenset(eos_ids)
        self.kv = KVPages(engine.pool_pages, engine.page_size,
                          enable_prefix_cache=engine.enable_prefix_cache)
        self.num_slots = engine.num_slots
        self.scratch_slot = self.num_slots
        self.max_width = max(buckets.page_widths(engine))
        self.num_stop = engine.max_stop_token_ids
        # Host copy of every slot's block table; row `scratch_slot` stays zero (padding rows).
        self.block_tables = np.zeros((self.num_slots + 1, self.max_width), np.int32)
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self.waiting: list[Sequence] = []  # sorted by Sequence.order
        self.running: list[Sequence] = []  # sorted by Sequence.order
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._ids = itertools.count()
        self._layouts: dict[int, packing.PrefillLayout] = {}
        self.step_id = 0
        self.num_preemptions = 0

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request: Request, *, seed: int) -> list[Sequence]:
        """Queue the request's n samples (sample i uses seed + i); returns them."""
        seqs: list[Sequence] = []
        for i in range(request.n):
            seq = Sequence(next(self._ids), request, i, seed=seed + i,
                           parent=seqs[0] if seqs else None, num_stop=self.num_stop)
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
        rows_steps: list[int] = []
        chunks: list[tuple[Sequence, int, int]] = []  # (seq, start, length)
        preempted: list[Sequence] = []
        lookups: list[tuple[int, int]] = []
        num_steps = cfg.decode_steps if not self._prefill_can_join() else 1
        spec_k = self._spec_tier()
        if spec_k:
            num_steps = 1 + spec_k

        # 1. decodes, highest priority first; a missing page preempts from the back.
        for seq in list(self.running):
            if (seq.status != RUNNING or not seq.can_sample()
                    or (seq.num_computed < seq.num_tokens and not self._slot_holds_last(seq))):
                continue
            if seq.spec_inflight and seq.room() < num_steps:
                # A speculative step in flight may have emitted fewer tokens than booked, so
                # the device may sample more than room() says: wait until it is read, or
                # the device would emit tokens this step's plan has no place for.
                continue
            k = min(num_steps, seq.room())
            # A speculative row writes up to 1 + spec_k positions, all before max_len.
            need = min(seq.num_computed + num_steps, seq.max_len) if spec_k else (
                seq.num_computed + k)
            if not self._reserve(seq, need, step, preempted, self_ok=True):
                continue
            decode.append(seq)
            rows_steps.append(k)
            seq.scheduled_step = step
            budget -= 1 + spec_k

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
                if not self._admissible(seq, step):
                    continue
                if not self._free_slots or budget <= 0:
                    break
                hit = ([], []) if seq.uses_penalties else self.kv.lookup(seq.tokens,
                                                                         seq.num_tokens)
                start = len(hit[0]) * cfg.page_size
                n = self._chunk_len(seq.num_tokens - start, chunks, budget)
                if n == 0:
                    break
                fresh = self.kv.allocate(seq.seq_id, start + n, hit=hit)
                if fresh is None:
                    break
                if seq.num_cached_tokens < 0:
                    seq.num_cached_tokens = start
                    seq.first_scheduled = time.monotonic()
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
        for seq, k in zip(decode, rows_steps):
            seq.num_computed += k
            seq.num_pending += k
            seq.inflight += 1
            seq.spec_inflight += spec_k > 0
        samples = []
        for seq, start, n in chunks:
            seq.num_computed = start + n
            sample = seq.num_computed == seq.num_tokens and seq.can_sample()
            if sample:
                seq.num_pending += 1
                seq.live = True
            samples.append(sample)
            seq.inflight += 1
            if seq.index == 0 and seq.prompt_done_step < 0 and seq.num_computed >= seq.prompt_len:
                seq.prompt_done_step = step
        # (Decode rows need no registering here: their new positions hold pending tokens, and
        # `_extend` registers the blocks their tokens complete.)
        for seq, _, _ in chunks:
            self.kv.register(seq.seq_id, seq.tokens, min(seq.num_computed, seq.num_tokens))
        self.num_preemptions += len(preempted)
        used = cfg.max_num_batched_tokens - budget
        if not spec_k:
            used += sum(rows_steps) - len(rows_steps)
        out = self._build(step, decode, rows_steps, num_steps, chunks, samples, preempted,
                          finished, used)
        out.lookups = lookups
        out.spec_k = spec_k if decode else 0
        return out

    def _spec_tier(self) -> int:
        """The speculative depth of this step's decode rows (0: plain decode)."""
        plan = self.spec
        if plan is None:
            return 0
        if not plan.adaptive:
            return plan.max_k
        rows = [s for s in self.running if s.status == RUNNING
                and s.num_computed >= s.num_tokens and s.can_sample()]
        if not rows:
            return 0
        batch = buckets.decode_shape(self.cfg, len(rows), 1)[0]
        return plan.choose([(plan.acceptance(s.spec_kept, s.spec_rejected), s.draft_lag)
                            for s in rows], batch)

    @staticmethod
    def _slot_holds_last(seq: Sequence) -> bool:
        """Every step that carried the sequence has been read and its device slot holds its
        last token, uncached (a row that waited out a speculative step): it decodes on."""
        return (seq.live and seq.num_pending == 0 and seq.inflight == 0
                and seq.num_computed == seq.num_tokens - 1)

    def _admissible(self, seq: Sequence, step: int) -> bool:
        """A waiting sequence may be admitted: no dispatched step still carries it, and sample
        0 of its request has scheduled its whole prompt (in an earlier step)."""
        if seq.inflight:
            return False
        parent = seq.parent
        return parent is None or 0 <= parent.prompt_done_step < step

    def _prefill_can_join(self) -> bool:
        """Whether a prefill chunk could be scheduled now: a running sequence part-way through
        its known tokens, or a waiting one that could be admitted (a free slot)."""
        if any(s.num_computed < s.num_tokens for s in self.running):
            return True
        if not self._free_slots or self.kv.num_free == 0:  # nothing could be admitted now
            return False
        return any(self._admissible(s, self.step_id) for s in self.waiting)

    def _chunk_len(self, remaining: int, chunks: list, budget: int) -> int:
        """Tokens the next prefill row may take: within the budget and a compiled shape."""
        limit = buckets.max_chunk(self.cfg, len(chunks) + 1)
        if any(n > limit for _, _, n in chunks):
            return 0
        return max(min(remaining, budget, limit), 0)

    def _reserve(self, seq: Sequence, num_tokens: int, step: int, preempted: list[Sequence],
                 *, self_ok: bool) -> bool:
        """Give `seq` pages for `num_tokens` positions, preempting lower-priority running
        sequences not scheduled in this step. With `self_ok`, preempt `seq` itself when no
        victim is left; returns False when `seq` does not run in this step."""
        held = len(self.kv.pages(seq.seq_id))
        if held * self.cfg.page_size >= num_tokens:  # the common case: nothing to allocate
            return True
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
        seq.live = False
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

    def layout(self, chunk: int) -> packing.PrefillLayout:
        """The prefill row layout for chunk length `chunk` (full block-table width)."""
        lay = self._layouts.get(chunk)
        if lay is None:
            lay = self._layouts[chunk] = packing.PrefillLayout(chunk, self.max_width,
                                                               self.num_stop)
        return lay

    def _build(self, step, decode, rows_steps, num_steps, chunks, samples, preempted, finished,
               used) -> SchedulerOutput:
        cfg = self.cfg
        nd = len(decode)
        if nd:
            # The last position a row may write in this dispatch sets the table width.
            last = max(s.num_computed - 1 for s in decode)
            b, w = buckets.decode_shape(cfg, nd, last // cfg.page_size + 1)
        else:
            b, w = 0, 0
        slots = np.full(b, self.scratch_slot, np.int32)
        slots[:nd] = [s.slot for s in decode]
        decode_inputs = packing.decode_rows(slots, self.block_tables[slots, :w])
        nr = len(chunks)
        r, t = buckets.prefill_shape(cfg, nr, max(n for _, _, n in chunks)) if nr else (0, 0)
        lay = self.layout(t)
        prefill = lay.empty(r, self.scratch_slot)
        for i, (seq, start, n) in enumerate(chunks):
            lay.pack_row(prefill, i, tokens=seq.tokens[start: start + n],
                         block_table=self.block_tables[seq.slot], slot=seq.slot, start=start,
                         sample=samples[i], prompt_len=seq.prompt_len, max_len=seq.max_len,
                         floats=seq.float_params, ints=seq.int_params, stop_ids=seq.stop_row)
        return SchedulerOutput(
            step=step, decode_seqs=decode, decode_inputs=decode_inputs,
            decode_rows_steps=np.asarray(rows_steps, np.int32), num_steps=num_steps if nd else 1,
            decode_full=buckets.decode_full(cfg, num_steps if nd else 1,
                                            any(s.needs_full_sampler for s in decode)),
            prefill_seqs=[c[0] for c in chunks], prefill_inputs=prefill,
            prefill_sample=np.asarray(samples, bool),
            prefill_lens=np.asarray([n for _, _, n in chunks], np.int32), prefill_shape=(r, t),
            num_batched_tokens=used, preempted=preempted, finished=finished)

    # -- results -------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, decode_tokens: np.ndarray,
                           prefill_tokens: np.ndarray,
                           spec_stats: np.ndarray | None = None) -> list[TokenEvent]:
        """Apply a step's sampled tokens (decode [num_steps, >= B], -1 where the device had
        stopped the row; prefill [>= R]); returns one TokenEvent per still unfinished sequence
        that got tokens. Finished sequences release their pages and slot here. A speculative
        step's rows emit up to their planned count; `spec_stats` [>= B] (proposed, kept) per
        row update their acceptance estimates."""
        events = []
        outcomes: list[tuple[int, int]] = []  # (proposed, kept) of a speculative step's rows
        if out.decode_seqs:
            cols = decode_tokens[:, : len(out.decode_seqs)].T.tolist()  # one list per row
        for i, seq in enumerate(out.decode_seqs):
            seq.inflight -= 1
            seq.spec_inflight -= out.spec_k > 0
            planned = int(out.decode_rows_steps[i])
            if seq.status == FINISHED:
                continue
            seq.num_pending -= planned
            row = cols[i][:planned]
            ev = self._extend(seq, row, False, i)
            if ev.tokens or ev.finish_reason is not None:
                events.append(ev)
            if out.spec_k:
                if spec_stats is not None:
                    proposed, kept = (int(x) for x in spec_stats[i])
                    outcomes.append((proposed, kept))
                    if proposed:
                        seq.spec_kept = ROW_DECAY * seq.spec_kept + kept
                        seq.spec_rejected = ROW_DECAY * seq.spec_rejected + (proposed > kept)
                        # The proposer saw all but the bonus token of a fully kept run.
                        seq.draft_lag = int(len(ev.tokens) == out.spec_k + 1)
                    elif self.spec.catch_up is not None:  # it only caught up
                        seq.draft_lag = (max(seq.draft_lag - self.spec.catch_up, 0)
                                         + len(ev.tokens))
                if seq.status != FINISHED:
                    if not ev.tokens:
                        logger.error("speculative step returned no token for %r", seq)
                        self._finish(seq, "error")
                        events.append(TokenEvent(seq, [], "error", False, i))
                    # Give back the positions booked for drafts that were not kept.
                    seq.num_computed -= planned - len(ev.tokens)
                continue
            if self.spec is not None and self.spec.adaptive:  # its evidence fades
                seq.spec_kept *= RELAX
                seq.spec_rejected *= RELAX
                seq.draft_lag += len(ev.tokens)
            if seq.status != FINISHED and len(ev.tokens) < planned:
                # The device stopped a row the host would not have: the two disagree on a
                # stop rule. Never leave it running on a slot that no longer samples.
                logger.error("device stopped %r early without a stop token", seq)
                self._finish(seq, "error")
                events.append(TokenEvent(seq, [], "error", False, i))
        if self.spec is not None and self.spec.adaptive and out.decode_seqs:
            if out.spec_k:
                self.spec.record(outcomes)
            else:
                self.spec.relax()
        for i, seq in enumerate(out.prefill_seqs):
            seq.inflight -= 1
            if not out.prefill_sample[i] or seq.status == FINISHED:
                continue
            seq.num_pending -= 1
            seq.draft_lag = 0  # a proposer's prefill saw every token before the sampled one
            events.append(self._extend(seq, [int(prefill_tokens[i])], True, i))
        return events

    def discard(self, out: SchedulerOutput) -> None:
        """Forget a step whose results will never come (its dispatch failed)."""
        for seq in itertools.chain(out.decode_seqs, out.prefill_seqs):
            seq.inflight -= 1
        for seq in out.decode_seqs:
            seq.spec_inflight -= out.spec_k > 0
        for seq, sample in zip(out.prefill_seqs, out.prefill_sample):
            if sample:
                seq.num_pending -= 1
        for seq, k in zip(out.decode_seqs, out.decode_rows_steps):
            seq.num_pending -= int(k)

    def _extend(self, seq: Sequence, tokens: list[int], is_prefill: bool, row: int
                ) -> TokenEvent:
        """Append a step's tokens (up to the first -1) to `seq`, stopping at the first that
        ends it: EOS (unless ignore_eos), a stop id, or max_len."""
        reason: FinishReason | None = None
        n = 0
        room = seq.max_len - seq.num_tokens
        eos = () if seq.ignore_eos else self.eos_ids
        for t in tokens:
            if t < 0:
                break
            n += 1
            if t in eos or t in seq.stop_ids:
                reason = "stop"
                break
            if n >= room:
                reason = "length"
                break
        kept = tokens[:n]
        before = seq.num_tokens
        seq.tokens[before: before + n] = kept
        seq.num_tokens += n
        g = self.cfg.page_size
        if reason is not None:
            self._finish(seq, reason)
        elif seq.status == RUNNING and seq.num_tokens // g > before // g:  # a block filled up
            self.kv.register(seq.seq_id, seq.tokens, min(seq.num_computed, seq.num_tokens))
        return TokenEvent(seq, kept, reason, is_prefill, row)

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
