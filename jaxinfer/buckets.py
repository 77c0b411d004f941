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
