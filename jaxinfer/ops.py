"""Kernel dispatch: the one place that chooses a Pallas kernel or its plain-JAX reference.

Models call these functions and never import `pallas_kernels` directly, so every model runs on
CPU with the references and on GPU with the kernels, chosen by `EngineConfig.kernels`. With
`kernels="pallas"` on a CPU backend the kernels run in Pallas interpret mode (slow, exact), which
is how CI checks them.

Attention routing: a step with at most `DECODE_MAX_T` new tokens per sequence (decode and
speculative verification) goes to the paged decode kernel (flash-decoding, split over the
sequence); longer steps (prefill chunks) go to the flash prefill kernel. Both read the same paged
cache, so chunked prefill and prefix-cache hits need nothing special.
"""

from __future__ import annotations

import jax

from jaxinfer.config import KERNELS, Kernels
from jaxinfer.errors import ConfigError
from pallas_kernels import paged_attention as _paged

DECODE_MAX_T = 8  # query tokens per sequence up to which the decode kernel is used


def check_kernels(kernels: Kernels) -> None:
    """Raise a clear ConfigError for a kernel choice this build cannot run."""
    if kernels not in KERNELS:
        raise ConfigError(f"unknown kernels {kernels!r} (choose one of {', '.join(KERNELS)})")


def use_interpret() -> bool:
    """Pallas kernels run in interpret mode where there is no GPU (CI)."""
    return jax.default_backend() != "gpu"


def paged_attention(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [L, K, P, G, H] bf16/f16/f32, or int8/float8_e4m3fn with scales
    v_pages: jax.Array,  # [L, K, P, G, H]
    layer: jax.Array | int,  # int32 scalar: which layer of the pool
    block_tables: jax.Array,  # [B, W] int32
    seq_lens: jax.Array,  # [B] int32 cached tokens per sequence, this step's included
    positions: jax.Array,  # [B, T] int32
    *,
    k_scale: jax.Array | None = None,  # [L, K, P] float32, quantized caches only
    v_scale: jax.Array | None = None,  # [L, K, P] float32
    scale: float,
    sliding_window: int | None,
    kernels: Kernels,
) -> jax.Array:
    """Causal attention of T new queries per sequence over its paged cache -> [B, T, N, H]."""
    check_kernels(kernels)
    kw = dict(k_scale=k_scale, v_scale=v_scale, scale=scale, sliding_window=sliding_window)
    args = (q, k_pages, v_pages, layer, block_tables, seq_lens, positions)
    if kernels == "reference":
        return _paged.paged_attention_reference(*args, **kw)
    if q.shape[1] <= DECODE_MAX_T:
        from pallas_kernels import paged_decode_attention as _decode
        return _decode.paged_decode_attention(*args, **kw, interpret=use_interpret())
    from pallas_kernels import flash_attention as _flash
    return _flash.flash_prefill_attention(*args, **kw, interpret=use_interpret())


def write_kv(
    k_pages: jax.Array,  # [L, K, P, G, H]
    v_pages: jax.Array,
    k_scale: jax.Array | None,  # [L, K, P] float32 when the cache is quantized, else None
    v_scale: jax.Array | None,
    layer: jax.Array | int,
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    slots: jax.Array,  # [B, T] flat slot page * G + offset; < 0 for padding
    *,
    kernels: Kernels,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Store this step's keys and values in the cache pages (quantizing them for an int8/fp8
    cache); returns (k_pages, v_pages, k_scale, v_scale)."""
    check_kernels(kernels)
    if k_scale is None:
        return (_paged.write_pages(k_pages, layer, k, slots),
                _paged.write_pages(v_pages, layer, v, slots), None, None)
    from pallas_kernels import kv_write as _kv_write
    k_pages, k_scale = _kv_write.write_pages_quantized(k_pages, k_scale, layer, k, slots)
    v_pages, v_scale = _kv_write.write_pages_quantized(v_pages, v_scale, layer, v, slots)
    return k_pages, v_pages, k_scale, v_scale
