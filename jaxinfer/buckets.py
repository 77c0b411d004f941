"""Static shape buckets: the only module that rounds a size up (STYLE.md rule 7).

Every jitted step runs at a bucketed batch size, query length and block-table width, so the
set of compiled programs is finite and known at warm-up.
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


def batch_bucket(engine: EngineConfig, n: int) -> int:
    return round_up(max(n, 1), engine.batch_buckets, "batch size")


def prefill_bucket(engine: EngineConfig, n: int) -> int:
    return round_up(max(n, 1), engine.prefill_buckets, "prefill chunk length")


def page_bucket(engine: EngineConfig, num_pages: int) -> int:
    return round_up(max(num_pages, 1), engine.page_table_buckets, "pages per sequence")


def max_prefill_chunk(engine: EngineConfig) -> int:
    return engine.prefill_buckets[-1]


def all_buckets(engine: EngineConfig) -> dict[str, tuple[int, ...]]:
    return {"batch": engine.batch_buckets, "prefill": engine.prefill_buckets,
            "pages": engine.page_table_buckets}


# -- serving (serve/engine.py): the static shapes of the engine's two step programs ----------

def serve_page_widths(engine: EngineConfig) -> tuple[int, ...]:
    """Decode block-table widths; the last covers the longest sequence."""
    if engine.serve_page_buckets is not None:
        return engine.serve_page_buckets
    full = engine.pages_per_seq
    return tuple(sorted({max(full // 4, 1), full}))


def serve_num_slots(engine: EngineConfig) -> int:
    """Decode slots: the most sequences that run (hold a slot) at once."""
    return engine.serve_decode_buckets[-1]


def serve_decode_shapes(engine: EngineConfig) -> list[tuple[int, int]]:
    """Every (batch B, block-table width W) a decode step is compiled for."""
    return [(b, w) for b in engine.serve_decode_buckets for w in serve_page_widths(engine)]


def serve_decode_shape(engine: EngineConfig, rows: int, max_pages: int) -> tuple[int, int]:
    """(B, W) for a decode step of `rows` sequences holding at most `max_pages` pages."""
    return (round_up(max(rows, 1), engine.serve_decode_buckets, "decode batch"),
            round_up(max(max_pages, 1), serve_page_widths(engine), "pages per sequence"))


def serve_prefill_shapes(engine: EngineConfig) -> list[tuple[int, int]]:
    """Every (rows R, chunk T) a prefill step is compiled for: R * T within the token budget
    (the smallest chunk is always allowed for one row)."""
    out = [(r, t) for r in engine.serve_prefill_rows for t in engine.serve_prefill_buckets
           if r * t <= engine.max_num_batched_tokens]
    return out or [(1, engine.serve_prefill_buckets[0])]


def serve_prefill_shape(engine: EngineConfig, rows: int, max_chunk: int
                        ) -> tuple[int, int] | None:
    """The compiled (R, T) for `rows` chunks of at most `max_chunk` tokens, or None when no
    compiled shape holds them."""
    r = next((b for b in engine.serve_prefill_rows if b >= rows), None)
    t = next((b for b in engine.serve_prefill_buckets if b >= max_chunk), None)
    if r is None or t is None or (r, t) not in serve_prefill_shapes(engine):
        return None
    return r, t


def serve_max_chunk(engine: EngineConfig, rows: int) -> int:
    """The longest chunk any of `rows` prefill rows may have (0: `rows` rows never fit)."""
    r = next((b for b in engine.serve_prefill_rows if b >= rows), None)
    if r is None:
        return 0
    fits = [t for rr, t in serve_prefill_shapes(engine) if rr == r]
    return max(fits, default=0)
