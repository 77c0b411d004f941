"""Paged decode attention (flash-decoding) for small T, as a Pallas Triton kernel.

Decode (T = 1) and speculative verification (T <= 8) read the whole cached context for a handful
of queries, so the kernel is bound by KV bandwidth; everything here serves reading each page once
and keeping many bytes in flight:

- One program handles one (sequence, kv head, split): all T * N/K query rows that share the kv
  head are stacked into the M rows of one tile, so each page is read once per kv head (GQA/MQA).
  M is padded to at least 16 because the Triton dot needs M >= 16; the padded rows cost tensor-core
  work, which is free in a bandwidth-bound kernel.
- Split-K over the sequence (flash-decoding): `k_splits` programs per (sequence, kv head) each
  take a contiguous range of page blocks and return an unnormalized output plus its running max
  and sum; a small jnp log-sum-exp combine merges them. With one split the kernel normalizes and
  writes the final output itself.
- The page loop's trip count comes from `seq_lens` (and the sliding window), never from the
  block-table width, so a program only touches pages its sequence needs. A split's range is
  computed at run time from the sequence's length, so short and long sequences in one batch
  share the work evenly among their splits.
- Pages come straight from the whole `[L, K, P, G, H]` pool (the layer index is a runtime scalar
  read inside the kernel), gathered `pages_per_block` at a time through the block table. One
  layer's and head's `P x G x H` pages must stay under 2**31 bytes: past that the served model
  answered wrong tokens on an H200 (int32 offsets; which of the cache kernels overflows is not
  pinned down yet), so `jaxinfer.kv_cache.max_pages` caps the pool there.
- The last block of a sequence is peeled off the main loop: only it needs the page-id clamp (its
  block may run past the sequence's last page; the clamp re-reads a page the block already
  needs) and the value-row mask (slots past `seq_len` may hold stale or NaN data, and 0 * NaN
  would poison the output). Full blocks keep a plain load -> dot chain for Triton's pipeliner.
- int8 / float8_e4m3fn caches are loaded as-is (half the bytes) and converted in registers; the
  per-page-per-head K scale multiplies the logits' columns and the V scale the probabilities'
  columns, so no dequantized tile is ever materialized.

Softmax runs in float32 in base 2 (logits pre-multiplied by log2(e)). Masked logits are -inf
against a finite running-max floor, so a row that sees no key yields exactly zero (no NaN):
padding rows (seq_len 0) return zeros.

Measured on an H100 SXM (jax 0.11.2, CUPTI; `benchmarks/results/kernel_decode_h100.jsonl`),
32/8 heads, H=128, pages of 16: B=64 at context 2048 reads bf16 KV at 2.43 TB/s (JAX's Pallas
paged kernel 1.84, XLA 0.77), B=8 at 16384 at 2.40-2.47 TB/s (JAX's 2.15). int8/fp8 pages take
1.27x/1.22x less time than bf16: the 8-bit path is bound by converting and feeding the dots,
not by bytes (1.5 TB/s of 8-bit KV).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_attention import paged_attention_reference

logger = logging.getLogger(__name__)

_LOG2E = math.log2(math.e)
_M_FLOOR = -1e30  # running-max start: finite, so exp2(-inf - floor) = 0 and no inf - inf
_QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_MIN_DOT = 16  # Triton's tl.dot needs every block dim >= 16


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DecodeTuning:
    """Tuning knobs of the decode kernel (all static; defaults measured on an H100 SXM).

    A compute block is `pages_per_block` pages of K and of V; with None it is
    `block_tokens_16bit` tokens (64) for 16-bit pages, twice that for 8-bit pages and half for
    f32, rounded to whole pages. With `k_splits=None` the split count gives about
    `min_programs` programs in all (1024: 2 splits at B=64 x 8 kv heads, 16 at B=8), keeping
    `min_blocks_per_split` blocks per split. On the H100 (jax 0.11.2) 64-token bf16 blocks,
    4 warps and 3 stages streamed best, and about a thousand programs beat both fewer, longer
    ones and many short ones. `quantized_compute` picks the dot operand type for 8-bit pages:
    "float16" (q rows scaled to |q| <= 1, so no overflow), "query" (q's dtype) or "auto" (f16
    for fp8, whose conversion to f16 is one instruction per pair; q's dtype for int8).
    `normalize_single_split`: with one split the kernel normalizes and writes the output.
    """

    pages_per_block: int | None = None
    block_tokens_16bit: int = 64
    k_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    min_programs: int = 1024
    min_blocks_per_split: int = 2
    quantized_compute: Literal["auto", "float16", "query"] = "auto"
    normalize_single_split: bool = True


DEFAULT = DecodeTuning()


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def block_pages(cfg: DecodeTuning, page_size: int, itemsize: int, width: int) -> int:
    """Pages per compute block: a power of two, >= 16 tokens (the dot's minimum), and no more
    than the (power-of-two-rounded) block-table width."""
    if cfg.pages_per_block is not None:
        ppb = cfg.pages_per_block
    else:
        tokens = max(_MIN_DOT, cfg.block_tokens_16bit * 2 // itemsize)
        ppb = max(1, _next_pow2(tokens) // page_size)
    ppb = min(ppb, _next_pow2(width))
    ppb = max(ppb, -(-_MIN_DOT // page_size))
    if ppb & (ppb - 1):
        raise ValueError(f"pages_per_block must be a power of two, got {ppb}")
    return ppb


def choose_splits(cfg: DecodeTuning, programs: int, max_blocks: int) -> int:
    """Splits per (sequence, kv head): enough for `min_programs` programs in all (the H100
    streams best with about a thousand page-walking programs in flight; see `DecodeTuning`),
    capped so that a split keeps `min_blocks_per_split` blocks of the longest sequence."""
    limit = max(1, max_blocks // cfg.min_blocks_per_split)
    if cfg.k_splits is not None:
        return max(1, min(cfg.k_splits, max_blocks))
    return max(1, min(limit, -(-cfg.min_programs // programs)))


def _decode_kernel(layer_ref, lens_ref, bt_ref, qpos_ref, q_ref, k_ref, v_ref, *rest,
                   is_quantized: bool, page_size: int, pages_per_block: int, k_splits: int,
                   scale: float, sliding_window: int | None, compute_dtype, precision,
                   use_row_scaled_q: bool, normalize: bool):
    if is_quantized:
        ks_ref, vs_ref, *out_refs = rest
    else:
        ks_ref = vs_ref = None
        out_refs = rest
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    width = bt_ref.shape[1]
    g, ppb = page_size, pages_per_block
    bk = g * ppb
    rows, head_dim = q_ref.shape

    layer = layer_ref[0]
    seq_len = lens_ref[b]
    qpos = qpos_ref[...]  # [Mp] int32, -1 on padded rows
    if use_row_scaled_q:
        # f16 operands for 8-bit pages: q rows scaled to |q| <= 1 so f16 cannot overflow; the
        # row scale goes back onto the logits (f16 keeps more mantissa than bf16 in range).
        qf = q_ref[...].astype(jnp.float32)
        q_amax = jnp.max(jnp.abs(qf), axis=1)
        q_amax = jnp.where(q_amax > 0, q_amax, 1.0)  # [Mp]
        q = (qf / q_amax[:, None]).astype(compute_dtype)  # [Mp, H]
        row_scale = (q_amax * (scale * _LOG2E))[:, None]  # [Mp, 1]
    else:
        q = q_ref[...].astype(compute_dtype)  # [Mp, H]
        row_scale = scale * _LOG2E

    # Token range this sequence's queries can see: [lo_tok, hi_tok).
    hi_tok = jnp.maximum(jnp.minimum(seq_len, jnp.max(qpos) + 1), 0)
    hi_page = jnp.minimum((hi_tok + g - 1) // g, width)
    if sliding_window is None:
        lo_page = jnp.int32(0)
    else:
        first_q = jnp.min(jnp.where(qpos >= 0, qpos, jnp.iinfo(jnp.int32).max))
        lo_page = jnp.maximum(first_q - sliding_window + 1, 0) // g
    n_blocks = (jnp.maximum(hi_page - lo_page, 0) + ppb - 1) // ppb
    per_split = (n_blocks + k_splits - 1) // k_splits
    first = jnp.minimum(split * per_split, n_blocks)
    last = jnp.minimum(first + per_split, n_blocks)
    full_end = jnp.maximum(jnp.minimum(last, n_blocks - 1), first)

    def body(j, carry, *, is_tail: bool):
        o, m, l = carry
        page0 = lo_page + j * ppb
        if is_tail:
            # The block may run past the last page: re-read that page instead (masked below).
            ids = bt_ref[b, jnp.minimum(page0 + jnp.arange(ppb, dtype=jnp.int32), hi_page - 1)]
        else:
            ids = bt_ref[b, pl.ds(page0, ppb)]  # [ppb] page ids
        k = k_ref[layer, h, ids].reshape(bk, head_dim).astype(compute_dtype)  # [BK, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # [Mp, BK]
        if is_quantized:
            ks = ks_ref[layer, h, ids]  # [ppb]
            s = s * jnp.broadcast_to(ks[:, None], (ppb, g)).reshape(bk)[None] * row_scale
        else:
            s = s * row_scale
        kv_pos = page0 * g + jnp.arange(bk, dtype=jnp.int32)  # [BK]
        visible = kv_pos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            visible &= kv_pos[None, :] > qpos[:, None] - sliding_window
        if is_tail:
            visible &= (kv_pos < seq_len)[None, :]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])  # [Mp, BK]
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[layer, h, ids].reshape(bk, head_dim).astype(compute_dtype)  # [BK, H]
        if is_tail:
            v = jnp.where((kv_pos < seq_len)[:, None], v, jnp.zeros_like(v))
        if is_quantized:
            vs = vs_ref[layer, h, ids]  # [ppb]
            p = p * jnp.broadcast_to(vs[:, None], (ppb, g)).reshape(bk)[None]
        pv = lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return o * alpha[:, None] + pv, m_new, l

    carry = (jnp.zeros((rows, head_dim), jnp.float32),
             jnp.full((rows,), _M_FLOOR, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    if ppb <= width:  # else no block can be full (and a static slice would not fit the table)
        carry = lax.fori_loop(first, full_end, functools.partial(body, is_tail=False), carry)
    else:
        full_end = first
    o, m, l = lax.fori_loop(full_end, last, functools.partial(body, is_tail=True), carry)

    if normalize:
        (out_ref,) = out_refs
        out_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def _check(q, k_pages, v_pages, block_tables, seq_lens, positions, k_scale, v_scale) -> None:
    """Trace-time shape and dtype checks (ValueError, STYLE.md rule 15)."""
    b, t, n, h = q.shape
    if k_pages.ndim != 5 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k/v pages must both be [L, K, P, G, H]; got {k_pages.shape}, "
                         f"{v_pages.shape}")
    _, kv_heads, _, page_size, hk = k_pages.shape
    if hk != h:
        raise ValueError(f"head dim of q ({h}) and pages ({hk}) differ")
    if n % kv_heads:
        raise ValueError(f"q heads ({n}) must be a multiple of kv heads ({kv_heads})")
    if h < _MIN_DOT or h & (h - 1):
        raise ValueError(f"the Pallas decode kernel needs a power-of-two head dim >= 16, got {h}")
    if page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two, got {page_size}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, W], got {block_tables.shape}")
    if seq_lens.shape != (b,) or positions.shape != (b, t):
        raise ValueError(f"seq_lens must be [{b}] and positions [{b}, {t}]; got "
                         f"{seq_lens.shape}, {positions.shape}")
    if jnp.dtype(q.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"q must be bf16/f16/f32, got {q.dtype}")
    kv_dtype = jnp.dtype(k_pages.dtype)
    if kv_dtype != jnp.dtype(v_pages.dtype):
        raise ValueError(f"k and v pages differ in dtype: {k_pages.dtype}, {v_pages.dtype}")
    if kv_dtype in _QUANT_DTYPES:
        want = k_pages.shape[:3]
        if k_scale is None or v_scale is None:
            raise ValueError(f"a {kv_dtype} cache needs k_scale and v_scale [L, K, P]")
        if k_scale.shape != want or v_scale.shape != want:
            raise ValueError(f"scales must be {want}; got {k_scale.shape}, {v_scale.shape}")
    elif kv_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported KV dtype {kv_dtype}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"scales are only for int8/fp8 caches, not {kv_dtype}")


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "cfg", "interpret"))
def paged_decode_attention(
    q: jax.Array,  # [B, T, N, H] bf16/f16/f32, T small (decode 1, verification <= 8)
    k_pages: jax.Array,  # [L, K, P, G, H] bf16/f16/f32, or int8/float8_e4m3fn with k_scale
    v_pages: jax.Array,  # [L, K, P, G, H]
    layer: jax.Array | int,  # int32 scalar: which layer of the pool
    block_tables: jax.Array,  # [B, W] int32 page ids
    seq_lens: jax.Array,  # [B] int32 cached tokens per sequence, this step's included
    positions: jax.Array,  # [B, T] int32 absolute position of each query
    *,
    k_scale: jax.Array | None = None,  # [L, K, P] float32, quantized caches only
    v_scale: jax.Array | None = None,  # [L, K, P] float32
    scale: float,
    sliding_window: int | None = None,
    cfg: DecodeTuning = DEFAULT,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of T new queries per sequence over its paged cache -> [B, T, N, H].

    Query t of sequence b sees the cached keys at positions <= positions[b, t] and
    < seq_lens[b] (and > positions[b, t] - sliding_window with a window). Rows with
    seq_lens 0 return zeros. Same semantics as `paged_attention_reference`.
    """
    _check(q, k_pages, v_pages, block_tables, seq_lens, positions, k_scale, v_scale)
    b, t, n, h = q.shape
    _, kv_heads, _, page_size, _ = k_pages.shape
    width = block_tables.shape[1]
    group = n // kv_heads
    rows = t * group
    rows_p = max(_MIN_DOT, _next_pow2(rows))
    kv_dtype = jnp.dtype(k_pages.dtype)
    is_quantized = kv_dtype in _QUANT_DTYPES
    wants_f16 = cfg.quantized_compute == "float16" or (
        cfg.quantized_compute == "auto" and kv_dtype == jnp.dtype(jnp.float8_e4m3fn))
    use_row_scaled_q = is_quantized and wants_f16 and jnp.dtype(q.dtype).itemsize == 2
    if use_row_scaled_q:
        compute_dtype = jnp.dtype(jnp.float16)
    elif is_quantized:
        compute_dtype = jnp.dtype(q.dtype)
    else:
        compute_dtype = jnp.promote_types(q.dtype, kv_dtype)
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    ppb = block_pages(cfg, page_size, kv_dtype.itemsize, width)
    splits = choose_splits(cfg, b * kv_heads, -(-width // ppb))

    # Rows (t, g) of kv head k: the T * N/K queries that read k's pages.
    q_rows = q.reshape(b, t, kv_heads, group, h).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(b, kv_heads, rows, h)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    qpos = jnp.broadcast_to(positions.astype(jnp.int32)[:, :, None], (b, t, group))
    qpos = jnp.pad(qpos.reshape(b, rows), ((0, 0), (0, rows_p - rows)), constant_values=-1)
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    args = [layer_arr, seq_lens.astype(jnp.int32), block_tables.astype(jnp.int32), qpos, q_rows,
            k_pages, v_pages]
    in_specs = [whole(layer_arr), whole(seq_lens), whole(block_tables),
                pl.BlockSpec((None, rows_p), lambda i, j, s: (i, 0)),
                pl.BlockSpec((None, None, rows_p, h), lambda i, j, s: (i, j, 0, 0)),
                whole(k_pages), whole(v_pages)]
    if is_quantized:
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
        in_specs += [whole(k_scale), whole(v_scale)]

    normalize = splits == 1 and cfg.normalize_single_split
    if normalize:
        out_shape = jax.ShapeDtypeStruct((b, kv_heads, rows_p, h), q.dtype)
        out_specs = pl.BlockSpec((None, None, rows_p, h), lambda i, j, s: (i, j, 0, 0))
    else:
        out_shape = [jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p, h), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv_heads, splits, rows_p), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, rows_p, h), lambda i, j, s: (i, j, s, 0, 0)),
                     pl.BlockSpec((None, None, None, rows_p), lambda i, j, s: (i, j, s, 0)),
                     pl.BlockSpec((None, None, None, rows_p), lambda i, j, s: (i, j, s, 0))]

    kernel = functools.partial(
        _decode_kernel, is_quantized=is_quantized, page_size=page_size, pages_per_block=ppb,
        k_splits=splits, scale=scale, sliding_window=sliding_window,
        compute_dtype=compute_dtype, precision=precision, use_row_scaled_q=use_row_scaled_q,
        normalize=normalize)
    result = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_ppb{ppb}_s{splits}",
    )(*args)

    if normalize:
        out = result[:, :, :rows]
    else:
        o, m, l = (x[:, :, :, :rows] for x in result)
        m_all = jnp.max(m, axis=2, keepdims=True)
        w = jnp.exp2(m - m_all)  # [B, K, S, rows]
        l_all = jnp.sum(l * w, axis=2)
        o_all = jnp.sum(o * w[..., None], axis=2)
        out = o_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    out = out.reshape(b, kv_heads, t, group, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
    return out.astype(q.dtype)


def paged_decode_attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [L, K, P, G, H]
    v_pages: jax.Array,  # [L, K, P, G, H]
    layer: jax.Array | int,
    block_tables: jax.Array,  # [B, W] int32
    seq_lens: jax.Array,  # [B] int32
    positions: jax.Array,  # [B, T] int32
    *,
    k_scale: jax.Array | None = None,  # [L, K, P] float32
    v_scale: jax.Array | None = None,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """The plain-JAX reference (gathers each sequence's pages; see `paged_attention_reference`)."""
    return paged_attention_reference(q, k_pages, v_pages, layer, block_tables, seq_lens,
                                     positions, k_scale=k_scale, v_scale=v_scale, scale=scale,
                                     sliding_window=sliding_window)
