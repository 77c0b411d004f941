"""Writing new keys/values into an int8 or float8_e4m3fn paged cache, quantizing on the way.

Scales are per page and per kv head (`scales [L, K, P]`, dequantized value = stored * scale), so
a page fills over many steps under one scale. The rule that keeps every stored value valid:

- When tokens land in a page, its scale becomes max(old scale, amax(new tokens) / qmax). A scale
  only grows while a page fills, so earlier tokens never clip.
- If it grew, the page's earlier contents are requantized to the new scale (dequantized with the
  old one first); new tokens are quantized with the new scale.
- A write that covers offset 0 of a page starts the page fresh: pages are reused after being
  freed, so the old scale and contents belong to another sequence and are ignored.
- Slots < 0 (padding) or past the pool are dropped. Symmetric quantization: int8 rounds to
  nearest with qmax 127; fp8 e4m3 uses qmax 448 and the float8 cast's round-to-nearest-even.

Pages are aggregated over the whole batch by sorting the step's tokens by page, so any slot
layout gets the right scale. Requantizing means reading and rewriting whole pages, so it is done
for at most B pages per call (B = rows of `slots`): a row that writes consecutive positions (as
every caller does: decode, verification, prefill chunks) has at most one page that is neither
fresh nor untouched - its first - so B always suffices. Should a stranger layout produce more
growing pages than that, the extra pages keep their old scale and their new tokens are clipped
to it (finite, never corrupting), rather than paying a pool-sized rewrite.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def quantize(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """x / scale as int8 (round to nearest) or float8_e4m3fn, clipped to +-qmax; 0 where the
    scale is 0 (an all-zero page)."""
    dtype = jnp.dtype(dtype)
    qmax = QMAX[dtype]
    y = jnp.where(scale > 0, x.astype(jnp.float32) / jnp.where(scale > 0, scale, 1.0), 0.0)
    y = jnp.clip(y, -qmax, qmax)
    if dtype == jnp.int8:
        y = jnp.round(y)
    return y.astype(dtype)


def write_pages_quantized(
    pages: jax.Array,  # [L, K, P, G, H] int8 or float8_e4m3fn
    scales: jax.Array,  # [L, K, P] float32 per-page-per-head scales
    layer: jax.Array | int,  # int32 scalar
    new: jax.Array,  # [B, T, K, H] float keys or values
    slots: jax.Array,  # [B, T] int32 flat slot page * G + offset; < 0 for padding
) -> tuple[jax.Array, jax.Array]:
    """Quantize `new` into `pages` at `slots`, growing page scales as needed (module docstring);
    returns (pages, scales)."""
    dtype = jnp.dtype(pages.dtype)
    if dtype not in QMAX:
        raise ValueError(f"quantized pages must be int8 or float8_e4m3fn, got {dtype}")
    _, kv_heads, num_pages, page_size, head_dim = pages.shape
    b, t = slots.shape
    if new.shape != (b, t, kv_heads, head_dim) or scales.shape != pages.shape[:3]:
        raise ValueError(f"new must be [{b}, {t}, {kv_heads}, {head_dim}] and scales "
                         f"{pages.shape[:3]}; got {new.shape}, {scales.shape}")
    qmax = QMAX[dtype]
    n = b * t

    # Tokens sorted by page (padding last, as page P), then grouped into per-page segments.
    flat = slots.reshape(n).astype(jnp.int32)
    valid = (flat >= 0) & (flat < num_pages * page_size)
    page = jnp.where(valid, flat // page_size, num_pages)  # [N]
    offset = jnp.where(valid, flat % page_size, 0)
    vals = new.reshape(n, kv_heads, head_dim).astype(jnp.float32)  # [N, K, H]
    amax = jnp.where(valid[:, None], jnp.max(jnp.abs(vals), axis=-1), 0.0)  # [N, K]
    order = jnp.argsort(page, stable=True)
    sorted_page = page[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), sorted_page[1:] != sorted_page[:-1]])
    seg_sorted = jnp.cumsum(starts) - 1
    seg = jnp.zeros((n,), jnp.int32).at[order].set(seg_sorted.astype(jnp.int32))  # token -> seg

    seg_page = jnp.full((n,), num_pages, jnp.int32).at[seg].set(page)  # [N] (P: unused)
    seg_used = seg_page < num_pages
    seg_fresh = jax.ops.segment_max((valid & (offset == 0)).astype(jnp.int32), seg,
                                    num_segments=n) > 0
    seg_amax = jax.ops.segment_max(amax, seg, num_segments=n)  # [N, K]
    seg_amax = jnp.maximum(seg_amax, 0.0)  # empty segments give -inf

    layer_scales = scales[layer]  # [K, P]
    old = jnp.where(seg_used[:, None],
                    layer_scales[:, jnp.minimum(seg_page, num_pages - 1)].T, 0.0)  # [N, K]
    base = jnp.where(seg_fresh[:, None], 0.0, old)
    want = jnp.maximum(base, seg_amax / qmax)
    grows = seg_used & ~seg_fresh & jnp.any(want > old, axis=1)  # page needs requantizing

    # At most B requantized pages per call (module docstring).
    cap = min(b, n)
    rank = jnp.cumsum(grows) - 1
    chosen = grows & (rank < cap)
    new_scale = jnp.where((grows & ~chosen)[:, None], old, want)  # [N, K]
    scales = scales.at[layer, :, seg_page].set(new_scale, mode="drop")  # [N, K] view

    req_page = jnp.full((cap,), num_pages, jnp.int32).at[
        jnp.where(chosen, rank, cap)].set(seg_page, mode="drop")  # [cap]
    req_ratio = jnp.zeros((cap, kv_heads), jnp.float32).at[
        jnp.where(chosen, rank, cap)].set(jnp.where(new_scale > 0, old / jnp.where(
            new_scale > 0, new_scale, 1.0), 0.0), mode="drop")  # [cap, K] old / new
    old_pages = pages[layer, :, jnp.minimum(req_page, num_pages - 1)]  # [cap, K, G, H]
    requant = quantize(old_pages.astype(jnp.float32) * req_ratio[:, :, None, None], 1.0, dtype)
    pages = pages.at[layer, :, req_page].set(requant, mode="drop")

    # New tokens, each with its page's (final) scale.
    tok_scale = new_scale[seg]  # [N, K]
    q = quantize(vals, tok_scale[:, :, None], dtype)  # [N, K, H]
    pages = pages.at[layer, :, page, offset].set(q, mode="drop")
    return pages, scales


def write_pages_quantized_reference(
    pages: jax.Array,  # [L, K, P, G, H] int8 or float8_e4m3fn
    scales: jax.Array,  # [L, K, P] float32
    layer: jax.Array | int,
    new: jax.Array,  # [B, T, K, H]
    slots: jax.Array,  # [B, T] int32
) -> tuple[jax.Array, jax.Array]:
    """The reference: `write_pages_quantized` itself is plain jnp (no Pallas kernel yet)."""
    return write_pages_quantized(pages, scales, layer, new, slots)
