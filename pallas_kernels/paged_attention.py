"""Attention over a paged KV cache: the plain-JAX reference (the Pallas kernel joins it here).

One function covers decode (T = 1), speculative verification (small T) and chunked prefill
(T = chunk): the T new queries of each sequence sit at `positions` and attend causally to every
cached key of that sequence up to their own position, including the keys written this step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a row with no visible key gives zeros, not NaN


def gather_pages(pages: jax.Array, layer: jax.Array | int, block_tables: jax.Array,
                 scales: jax.Array | None = None) -> jax.Array:
    """Contiguous keys [B, S, K, H] (S = W * G) of each sequence from pages [L, K, P, G, H].

    With `scales` [L, K, P] (an int8/fp8 cache) the pages are dequantized to float32."""
    x = pages[layer, :, block_tables]  # [B, W, K, G, H]: advanced indices first
    if scales is not None:
        s = scales[layer, :, block_tables]  # [B, W, K]
        x = x.astype(jnp.float32) * s[..., None, None]
    b, w, k, g, h = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(b, w * g, k, h)


def paged_attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [L, K, P, G, H]
    v_pages: jax.Array,  # [L, K, P, G, H]
    layer: jax.Array | int,  # which layer of the pool
    block_tables: jax.Array,  # [B, W] int32 page ids
    seq_lens: jax.Array,  # [B] int32 tokens in the cache for each sequence, this step included
    positions: jax.Array,  # [B, T] int32 position of each query
    *,
    k_scale: jax.Array | None = None,  # [L, K, P] float32 per-page-per-head scales (int8/fp8)
    v_scale: jax.Array | None = None,  # [L, K, P] float32
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal attention of new queries over their sequence's pages; returns [B, T, N, H] in
    q's dtype. Logits and softmax run in float32. A quantized cache (int8 or float8_e4m3fn
    pages) is dequantized as `pages * scale[layer, head, page]`."""
    b, t, n, h = q.shape
    k = gather_pages(k_pages, layer, block_tables, k_scale)  # [B, S, K, H]
    v = gather_pages(v_pages, layer, block_tables, v_scale)
    if k_scale is not None:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    kv_heads = k.shape[2]
    s = k.shape[1]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    kv_pos = jnp.arange(s, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    q_pos = positions[:, :, None]  # [B, T, 1]
    visible = (kv_pos <= q_pos) & (kv_pos < seq_lens[:, None, None])
    if sliding_window is not None:
        visible &= kv_pos > q_pos - sliding_window
    logits = jnp.where(visible[:, None, None, :, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(visible[:, None, None, :, :], probs, 0.0)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def write_pages(pages: jax.Array, layer: jax.Array | int, new: jax.Array, slots: jax.Array
                ) -> jax.Array:
    """Write new keys or values [B, T, K, H] into pages [L, K, P, G, H] at flat slots [B, T]
    (page * G + offset). Slots < 0 or past the pool (padding) are dropped."""
    _, _, num_pages, page_size, _ = pages.shape
    flat = slots.reshape(-1)
    valid = (flat >= 0) & (flat < num_pages * page_size)
    page = jnp.where(valid, flat // page_size, num_pages)  # out of bounds -> dropped
    offset = jnp.where(valid, flat % page_size, 0)
    vals = new.reshape(-1, new.shape[2], new.shape[3]).astype(pages.dtype)  # [B*T, K, H]
    return pages.at[layer, :, page, offset].set(vals, mode="drop")
