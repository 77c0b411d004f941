"""Static shape buckets: the only module that rounds a size up (STYLE.md rule 7).

Every device program runs at a bucketed shape, so the set of compiled programs is finite and
known at warm-up (`program_shapes`). One set for offline generation, the bench and the server:

- decode: batch B in `batch_buckets` (the largest is the number of decode slots) x block-table
  width W in `page_widths`;
- prefill: rows R in `prefill_rows` x chunk T in `prefill_buckets`, with R x T within the
  token budget `max_num_batched_tokens`, at the full block-table width.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxinfer.config import EngineConfig
from jaxinfer.errors import CapacityError


def round_up(n: int, buckets: Sequence[int], what: str) -> int:
    """Smallest bucket >= n; CapacityError when n exceeds the largest."""
    for b in buckets:
        if b >= n:
            return b
    raise CapacityError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def page_widths(engine: EngineConfig) -> tuple[int, ...]:
    """Decode block-table widths; the last covers the longest sequence. By default only that
    one: the Pallas kernels read only a row's own pages whatever the width, and every extra
    width doubles the decode programs (the reference attention, which reads every page of a
    table, gains from a narrow width through `page_buckets`)."""
    if engine.page_buckets is not None:
        return engine.page_buckets
    return (engine.pages_per_seq,)


def decode_shapes(engine: EngineConfig) -> list[tuple[int, int]]:
    """Every (batch B, block-table width W) a decode step is compiled for."""
    return [(b, w) for b in engine.batch_buckets for w in page_widths(engine)]


def decode_shape(engine: EngineConfig, rows: int, max_pages: int) -> tuple[int, int]:
    """(B, W) for a decode step of `rows` sequences holding at most `max_pages` pages."""
    return (round_up(max(rows, 1), engine.batch_buckets, "decode batch"),
            round_up(max(max_pages, 1), page_widths(engine), "pages per sequence"))


def prefill_shapes(engine: EngineConfig) -> list[tuple[int, int]]:
    """Every (rows R, chunk T) a prefill step is compiled for: R * T within the token budget
    (`EngineConfig` makes sure the smallest fits)."""
    return [(r, t) for r in engine.prefill_rows for t in engine.prefill_buckets
            if r * t <= engine.max_num_batched_tokens]


def prefill_shape(engine: EngineConfig, rows: int, max_chunk: int) -> tuple[int, int] | None:
    """The compiled (R, T) for `rows` chunks of at most `max_chunk` tokens, or None when no
    compiled shape holds them."""
    r = next((b for b in engine.prefill_rows if b >= rows), None)
    t = next((b for b in engine.prefill_buckets if b >= max_chunk), None)
    if r is None or t is None or (r, t) not in prefill_shapes(engine):
        return None
    return r, t


def max_chunk(engine: EngineConfig, rows: int) -> int:
    """The longest chunk any of `rows` prefill rows may have (0: `rows` rows never fit)."""
    r = next((b for b in engine.prefill_rows if b >= rows), None)
    if r is None:
        return 0
    fits = [t for rr, t in prefill_shapes(engine) if rr == r]
    return max(fits, default=0)


def decode_step_counts(engine: EngineConfig) -> tuple[int, ...]:
    """Decode tokens per dispatch that are compiled: 1 (beside prefill chunks) and
    `decode_steps` (decode-only steps)."""
    return tuple(sorted({1, engine.decode_steps}))


def decode_variants(engine: EngineConfig) -> list[tuple[int, bool]]:
    """(tokens per dispatch, full sampler) of the compiled decode programs. Decode-only steps
    have both samplers (argmax for all-greedy batches); with multi-step decoding on, the
    one-token steps that prefill chunks join always run the full sampler, which gives greedy
    rows their argmax too: a few percent of the steps pay for a sort, and warm-up compiles a
    quarter fewer programs."""
    if engine.decode_steps == 1:
        return [(1, False), (1, True)]
    return [(1, True), (engine.decode_steps, False), (engine.decode_steps, True)]


def decode_full(engine: EngineConfig, num_steps: int, wants_full: bool) -> bool:
    """Which sampler a decode dispatch of `num_steps` runs (see `decode_variants`)."""
    return wants_full or (num_steps == 1 and engine.decode_steps > 1)
