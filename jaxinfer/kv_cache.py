"""The paged KV cache (device) and its page allocator (host).

Layout `[L, K, P, G, H]` (layers, kv heads, pages, page size, head dim), as JAX's own Pallas
paged-attention kernels expect per layer: a page of one head is one contiguous `[G, H]` tile,
so a decode kernel streams whole pages, and sharding kv heads over `tp` splits the pool evenly.
The device sees only block tables `[B, W]` and lengths `[B]`; which sequence owns which page is
decided on the host by `jaxinfer.engine.kv_pages.KVPages` (reference counts, prefix cache).
`k_scale`/`v_scale` `[L, K, P]` hold per-page-per-head scales once the cache is quantized.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.errors import ConfigError

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
    return (model.num_layers, model.num_kv_heads, engine.pool_pages, engine.page_size, model.head_dim)


def is_quantized(engine: EngineConfig) -> bool:
    """An int8/fp8 cache: pages hold 8-bit values with float32 per-page-per-head scales."""
    return engine.kv_dtype in QUANTIZED_CACHE_DTYPES


def scale_shape(model: ModelConfig, engine: EngineConfig) -> tuple[int, ...]:
    return (model.num_layers, model.num_kv_heads, engine.pool_pages)


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


def write_slots(block_tables: jax.Array, positions: jax.Array, valid: jax.Array,
                page_size: int) -> jax.Array:
    """Flat cache slots (page * G + offset) of `positions` [B, T] through `block_tables`
    [B, W]; -1 where not `valid` or past the table."""
    width = block_tables.shape[1]
    page = jnp.take_along_axis(block_tables, jnp.clip(positions // page_size, 0, width - 1),
                               axis=1)
    inside = (positions >= 0) & (positions < width * page_size)
    return jnp.where(valid & inside, page * page_size + positions % page_size, -1)


# vLLM's CPU backend default for the KV cache (VLLM_CPU_KVCACHE_SPACE): where a device reports
# no memory statistics, the pool is sized to hold every slot at full length, up to this.
HOST_CACHE_BYTES = 4 * 2**30


def _device_kv_heads(model: ModelConfig, mesh: jax.sharding.Mesh) -> int:
    """KV heads on one device: split over tp unless replicated."""
    tp = mesh.shape.get("tp", 1)
    return model.num_kv_heads // tp if model.num_kv_heads % tp == 0 else model.num_kv_heads


def max_pages(model: ModelConfig, engine: EngineConfig) -> int:
    """The most pages the pool may have: one layer's and one KV head's pages (pages x page
    size x head dim elements) must stay under 2**31 bytes, past which the GPU cache kernels
    read or write the wrong pages (int32 offsets; which kernel overflows is not pinned down
    yet: this bound is what was measured). Measured on an H200 with the demo model
    (2 KV heads, head dim 64, pages of 16): bfloat16 at 2.4M pages and float32 at 1.2M and
    1M pages answered wrong tokens; 400k pages in either answered right."""
    per_page = engine.page_size * model.head_dim * jnp.dtype(engine.kv_dtype).itemsize
    return (2**31 - 1) // per_page


def page_bytes(model: ModelConfig, engine: EngineConfig, mesh: jax.sharding.Mesh) -> int:
    """Bytes one KV page takes on the fullest device of `mesh` (layers split over pp, KV heads
    over tp unless replicated), scales included."""
    pp = mesh.shape.get("pp", 1)
    layers = model.num_layers // pp
    heads = _device_kv_heads(model, mesh)
    item = jnp.dtype(engine.kv_dtype).itemsize
    per_page = 2 * layers * heads * engine.page_size * model.head_dim * item
    if is_quantized(engine):
        per_page += 2 * layers * heads * 4
    return per_page


def memory_stats(device) -> dict | None:
    """The device's allocator statistics with a `bytes_limit`, or None (CPU keeps none)."""
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return stats if stats and "bytes_limit" in stats else None


def size_pool(model: ModelConfig, engine: EngineConfig, mesh: jax.sharding.Mesh, *,
              reserved_bytes: int = 0, extra_page_bytes: int = 0) -> int:
    """Pages for `engine.num_pages` None: on devices with memory statistics (GPU), what fits in
    `gpu_memory_utilization` of the fullest device's memory after what is in use now (the
    weights) and `reserved_bytes` (slot state, activations), at most `max_pages`; elsewhere
    every decode slot at `max_seq_len`, within HOST_CACHE_BYTES. At least one sequence of
    `max_seq_len`.
    `extra_page_bytes`: what each page costs besides the model's KV (a draft model's cache)."""
    per_page = page_bytes(model, engine, mesh) + extra_page_bytes
    want = engine.num_slots * engine.pages_per_seq
    free = None
    for d in mesh.devices.flat:
        stats = memory_stats(d)
        if stats is None:
            continue
        room = (engine.gpu_memory_utilization * stats["bytes_limit"]
                - stats.get("bytes_in_use", 0) - reserved_bytes)
        free = room if free is None else min(free, room)
    if free is None:
        return max(min(want, HOST_CACHE_BYTES // per_page), engine.pages_per_seq)
    pages = min(int(free // per_page), max_pages(model, engine))
    if pages < engine.pages_per_seq:
        raise ConfigError(
            f"the KV cache does not fit: {max(free, 0) / 2**30:.2f} GiB left of "
            f"{engine.gpu_memory_utilization} of device memory holds {max(pages, 0)} pages of "
            f"{engine.page_size} tokens, fewer than one sequence of max_seq_len "
            f"{engine.max_seq_len} needs ({engine.pages_per_seq}); raise "
            "--gpu-memory-utilization, lower --max-seq-len or give --num-pages")
    return pages
