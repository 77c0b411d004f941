"""A hand-computable stand-in for the device, to test the scheduler without JAX (after
JetStream's `mock_engine`).

`FakeDevice` obeys the same contract as `jaxinfer.runner.ServingRunner`: it stores every token
it is fed in a fake paged cache (one int per cache slot) through the step's block tables, keeps
each slot's last sampled token on the "device" (decode rows never get their token from the
host), and samples

    next token = (sum of every token of the sequence + its length) % vocab

computed from what it reads back through the block table. A page shared by mistake, overwritten
by another sequence or never written changes the sum, so any bookkeeping error shows up in the
tokens; `expected_tokens` gives the right answer from the prompt alone.

`drive` runs the engine's loop shape: schedule step n, run it, then apply step n-1's results,
so the scheduler sees results one step late exactly as it does behind a real device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from serve.scheduler import Scheduler, SchedulerOutput, Sequence


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
        self.vocab = vocab
        self.page_size = cfg.page_size
        self.cache = np.full(cfg.num_pages * cfg.page_size, -1, np.int64)
        self.last = np.zeros(sched.num_slots + 1, np.int64)
        self.scratch = sched.scratch_slot
        self.steps = 0

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

    def step(self, out: SchedulerOutput) -> tuple[np.ndarray, np.ndarray]:
        """Run the decode rows, then the prefill rows; returns their sampled tokens."""
        self.steps += 1
        b = len(out.decode_slots)
        dec = np.full(b, -1, np.int64)
        for i in range(b):
            pos = int(out.decode_positions[i])
            if pos < 0:
                if out.decode_slots[i] != self.scratch:
                    raise AssertionError("a padding decode row points at a real slot")
                continue
            slot, bt = int(out.decode_slots[i]), out.decode_block_tables[i]
            self.cache[self._slot(bt, pos)] = self.last[slot]
            dec[i] = next_token(self._read(bt, pos + 1), self.vocab)
            self.last[slot] = dec[i]
        r = len(out.prefill_lens)
        pre = np.full(r, -1, np.int64)
        for i in range(r):
            n, start = int(out.prefill_lens[i]), int(out.prefill_starts[i])
            if n == 0:
                continue
            bt = out.prefill_block_tables[i]
            for j in range(n):
                self.cache[self._slot(bt, start + j)] = out.prefill_tokens[i, j]
            if out.prefill_sample[i]:
                pre[i] = next_token(self._read(bt, start + n), self.vocab)
                self.last[int(out.prefill_slots[i])] = pre[i]
        return dec, pre


def drive(sched: Scheduler, device: FakeDevice, *, max_steps: int = 10_000,
          on_step: Callable[[SchedulerOutput], None] | None = None,
          on_events: Callable[[list], None] | None = None,
          check: bool = True, min_steps: int = 0) -> dict[int, list[int]]:
    """Run until every sequence finished (and at least `min_steps` steps, for tests that add
    requests from `on_step`); returns seq_id -> generated tokens. The results of step n are
    applied after step n+1 has been scheduled and run, as in the engine."""
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
            for seq, tok, *_ in events:
                outputs.setdefault(seq.seq_id, []).append(tok)
            if on_events is not None:
                on_events(events)
        pending = (out, result) if result is not None else None
        if check:
            sched.check()
    raise AssertionError(f"not finished after {max_steps} steps: {sched.stats()}")


def finished_tokens(seq: Sequence) -> list[int]:
    return seq.output_ids()
