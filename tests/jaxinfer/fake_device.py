"""A hand-computable stand-in for the device, to test the scheduler without JAX (after
JetStream's `mock_engine`).

`FakeDevice` obeys the same contract as `jaxinfer.steps` (the programs the runner runs): it
reads the packed inputs of `jaxinfer.engine.packing`, stores every token it is fed in a fake
paged cache (one int per cache slot) through the step's block tables, keeps each slot's state on
the "device" (last sampled token, position, tokens left, active, stop ids: decode rows never get
anything from the host but their slot and block table), runs `num_steps` tokens per decode
dispatch, stops rows itself at EOS / stop ids / max_len, and samples

    next token = (sum of every token of the sequence + its length) % vocab

computed from what it reads back through the block table. A page shared by mistake, overwritten
by another sequence or never written changes the sum, so any bookkeeping error shows up in the
tokens; `expected_tokens` gives the right answer from the prompt alone.

`drive` runs the engine core's loop shape: schedule step n, run it, then apply step n-1's
results, so the scheduler sees results one step late exactly as it does behind a real device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from jaxinfer.engine import packing as pk
from jaxinfer.engine.scheduler import Scheduler, SchedulerOutput, Sequence


def next_token(tokens: list[int] | np.ndarray, vocab: int) -> int:
    return int((int(np.sum(tokens, dtype=np.int64)) + len(tokens)) % vocab)


def expected_tokens(prompt: list[int], n: int, vocab: int, *, stop: Callable[[int], bool]
                    = lambda t: False) -> list[int]:
    """The fake device's first `n` tokens for `prompt` (up to and including a stop token)."""
    seq, out = list(prompt), []
    for _ in range(n):
        t = next_token(seq, vocab)
        out.append(t)
        seq.append(t)
        if stop(t):
            break
    return out


class FakeDevice:
    """A fake paged cache and slot state; `step` executes one SchedulerOutput."""

    def __init__(self, sched: Scheduler, vocab: int) -> None:
        cfg = sched.cfg
        self.sched = sched
        self.vocab = vocab
        self.page_size = cfg.page_size
        self.cache = np.full(cfg.pool_pages * cfg.page_size, -1, np.int64)
        s = sched.num_slots + 1
        self.last = np.zeros(s, np.int64)
        self.pos = np.zeros(s, np.int64)
        self.remaining = np.zeros(s, np.int64)
        self.active = np.zeros(s, bool)
        self.ignore_eos = np.zeros(s, bool)
        self.stop_ids: list[set[int]] = [set() for _ in range(s)]
        self.scratch = sched.scratch_slot
        self.steps = 0
        self.decode_dispatches: list[int] = []  # num_steps of every decode dispatch

    def _slot(self, bt: np.ndarray, pos: int) -> int:
        g = self.page_size
        return int(bt[pos // g]) * g + pos % g

    def _read(self, bt: np.ndarray, length: int) -> np.ndarray:
        g = self.page_size
        pos = np.arange(length)
        vals = self.cache[bt[pos // g] * g + pos % g]
        if np.any(vals < 0):
            raise AssertionError(f"read an unwritten cache slot at positions "
                                 f"{pos[vals < 0][:5].tolist()}")
        return vals

    def _stops(self, slot: int, token: int) -> bool:
        eos = token in self.sched.eos_ids and not self.ignore_eos[slot]
        return eos or token in self.stop_ids[slot]

    def step(self, out: SchedulerOutput) -> tuple[np.ndarray, np.ndarray]:
        """Run the decode rows, then the prefill rows; returns their tokens (decode
        [num_steps, B] with -1 for stopped rows, prefill [R])."""
        self.steps += 1
        b = out.decode_inputs.shape[0] if out.decode_seqs else 0
        dec = np.full((out.num_steps, b), -1, np.int64)
        if b:
            self.decode_dispatches.append(out.num_steps)
        for k in range(out.num_steps if b else 0):
            for i in range(b):
                slot, bt = int(out.decode_inputs[i, 0]), out.decode_inputs[i, 1:]
                if slot == self.scratch or not self.active[slot]:
                    if slot == self.scratch and i < len(out.decode_seqs):
                        raise AssertionError("a real decode row points at the scratch slot")
                    continue
                pos = int(self.pos[slot])
                self.cache[self._slot(bt, pos)] = self.last[slot]
                tok = next_token(self._read(bt, pos + 1), self.vocab)
                dec[k, i] = tok
                self.last[slot], self.pos[slot] = tok, pos + 1
                self.remaining[slot] -= 1
                if self._stops(slot, tok) or self.remaining[slot] <= 0:
                    self.active[slot] = False
        r, t = out.prefill_shape
        pre = np.full(r, -1, np.int64)
        lay = self.sched.layout(t) if r else None
        for i in range(r):
            row = out.prefill_inputs[i]
            slot, start, n, sample, _, max_len = (int(x) for x in row[lay.meta])
            if n == 0:
                if slot != self.scratch:
                    raise AssertionError("a padding prefill row points at a real slot")
                continue
            bt = row[lay.block_table]
            for j in range(n):
                self.cache[self._slot(bt, start + j)] = row[j]
            ints = row[lay.ints]
            self.ignore_eos[slot] = bool(ints[pk.I_IGNORE_EOS])
            self.stop_ids[slot] = {int(x) for x in row[lay.stop_ids] if x >= 0}
            self.pos[slot] = start + n
            self.active[slot] = False
            if sample:
                tok = next_token(self._read(bt, start + n), self.vocab)
                pre[i] = tok
                self.last[slot] = tok
                self.remaining[slot] = max_len - (start + n) - 1
                self.active[slot] = self.remaining[slot] > 0 and not self._stops(slot, tok)
        return dec, pre


def drive(sched: Scheduler, device: FakeDevice, *, max_steps: int = 10_000,
          on_step: Callable[[SchedulerOutput], None] | None = None,
          on_events: Callable[[list], None] | None = None,
          check: bool = True, min_steps: int = 0) -> dict[int, list[int]]:
    """Run until every sequence finished (and at least `min_steps` steps, for tests that add
    requests from `on_step`); returns seq_id -> generated tokens. The results of step n are
    applied after step n+1 has been scheduled and run, as in the engine core."""
    outputs: dict[int, list[int]] = {}
    pending: tuple[SchedulerOutput, tuple] | None = None
    for _ in range(max_steps):
        if not sched.has_unfinished() and pending is None and sched.step_id >= min_steps:
            return outputs
        out = sched.schedule(time.monotonic())
        if on_step is not None:
            on_step(out)
        result = device.step(out) if out.has_work else None
        if pending is not None:
            events = sched.update_from_output(pending[0], *pending[1])
            for ev in events:
                outputs.setdefault(ev.seq.seq_id, []).extend(ev.tokens)
            if on_events is not None:
                on_events(events)
        pending = (out, result) if result is not None else None
        if check:
            sched.check()
    raise AssertionError(f"not finished after {max_steps} steps: {sched.stats()}")


def finished_tokens(seq: Sequence) -> list[int]:
    return seq.output_ids()
