"""The paged KV cache (device) and its page allocator (host).

Layout `[L, K, P, G, H]` (layers, kv heads, pages, page size, head dim), as JAX's own Pallas
paged-attention kernels expect per layer: a page of one head is one contiguous `[G, H]` tile,
so a decode kernel streams whole pages, and sharding kv heads over `tp` splits the pool evenly.
The device sees only block tables `[B, W]` and lengths `[B]`; which sequence owns which page is
decided on the host by `PageAllocator` (reference counted, ready for prefix sharing).
`k_scale`/`v_scale` `[L, K, P]` hold per-page-per-head scales once the cache is quantized.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.errors import CapacityError

CACHE_AXES = ("layers", "kv_heads", "pages", "page_size", "head_dim")
SCALE_AXES = ("layers", "kv_heads", "pages")
QUANTIZED_CACHE_DTYPES = ("int8", "float8_e4m3fn")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    k: jax.Array  # [L, K, P, G, H]
    v: jax.Array  # [L, K, P, G, H]
    k_scale: jax.Array | None = None  # [L, K, P] float32, quantized caches only
    v_scale: jax.Array | None = None

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def cache_shape(model: ModelConfig, engine: EngineConfig) -> tuple[int, ...]:
    return (model.num_layers, model.num_kv_heads, engine.num_pages, engine.page_size, model.head_dim)


def is_quantized(engine: EngineConfig) -> bool:
    """An int8/fp8 cache: pages hold 8-bit values with float32 per-page-per-head scales."""
    return engine.kv_dtype in QUANTIZED_CACHE_DTYPES


def scale_shape(model: ModelConfig, engine: EngineConfig) -> tuple[int, ...]:
    return (model.num_layers, model.num_kv_heads, engine.num_pages)


def abstract_cache(model: ModelConfig, engine: EngineConfig) -> PagedKVCache:
    sds = jax.ShapeDtypeStruct(cache_shape(model, engine), jnp.dtype(engine.kv_dtype))
    if not is_quantized(engine):
        return PagedKVCache(k=sds, v=sds)
    scales = jax.ShapeDtypeStruct(scale_shape(model, engine), jnp.float32)
    return PagedKVCache(k=sds, v=sds, k_scale=scales, v_scale=scales)


def cache_axes(engine: EngineConfig | None = None) -> PagedKVCache:
    """The cache's logical axes, as a pytree matching `PagedKVCache` (with scale leaves when
    `engine` asks for a quantized cache)."""
    if engine is None or not is_quantized(engine):
        return PagedKVCache(k=CACHE_AXES, v=CACHE_AXES)
    return PagedKVCache(k=CACHE_AXES, v=CACHE_AXES, k_scale=SCALE_AXES, v_scale=SCALE_AXES)


def init_cache(model: ModelConfig, engine: EngineConfig, shardings: PagedKVCache | None = None
               ) -> PagedKVCache:
    """A zeroed cache, created directly in its target sharding (never whole on one device).
    A quantized cache starts with zero scales: every page is written fresh before it is read."""
    shape, dtype = cache_shape(model, engine), jnp.dtype(engine.kv_dtype)
    make = jax.jit(lambda: jnp.zeros(shape, dtype),
                   out_shardings=None if shardings is None else shardings.k)
    if not is_quantized(engine):
        return PagedKVCache(k=make(), v=make())
    if shardings is not None and shardings.k_scale is None:
        raise ValueError("a quantized cache needs scale shardings: build them from "
                         "cache_axes(engine)")
    sshape = scale_shape(model, engine)
    make_scale = jax.jit(lambda: jnp.zeros(sshape, jnp.float32),
                         out_shardings=None if shardings is None else shardings.k_scale)
    return PagedKVCache(k=make(), v=make(), k_scale=make_scale(), v_scale=make_scale())


def pages_needed(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


class PageAllocator:
    """Host-side owner of the page pool: a free list plus reference counts.

    Reference counts let several sequences share a page (prefix caching); a page returns to the
    free list when its count drops to zero. Freeing a page that is not held raises.
    """

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, 2...
        self._refs = np.zeros(num_pages, dtype=np.int32)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` fresh pages; raise CapacityError (and take none) if fewer are free."""
        if n > len(self._free):
            raise CapacityError(f"need {n} KV pages, only {len(self._free)} free of {self.num_pages}")
        pages = [self._free.pop() for _ in range(n)]
        self._refs[pages] = 1
        return pages

    def try_allocate(self, n: int) -> list[int] | None:
        """Like `allocate`, but returns None when the pool is short (the scheduler preempts)."""
        return self.allocate(n) if n <= len(self._free) else None

    def share(self, pages: Iterable[int]) -> None:
        """Add a reference to pages already held (a second sequence reads them)."""
        pages = list(pages)
        if any(self._refs[p] <= 0 for p in pages):
            raise ValueError(f"cannot share pages that are not allocated: {pages}")
        for p in pages:
            self._refs[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; pages reaching zero return to the free list."""
        pages = list(pages)
        for p in pages:
            if not 0 <= p < self.num_pages or self._refs[p] <= 0:
                raise ValueError(f"double free or foreign page {p}")
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    def check(self) -> None:
        """Invariants: free pages have refcount 0, held pages > 0, no page listed twice."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        for p in range(self.num_pages):
            if (p in free) != (self._refs[p] == 0):
                raise AssertionError(f"page {p}: free={p in free} refcount={self._refs[p]}")
