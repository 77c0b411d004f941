"""Flash attention for prefill chunks over the paged KV cache (Pallas, Triton lowering).

The model writes a chunk's keys and values into the cache pages before attention runs, so the
T new queries of a sequence attend causally to everything the sequence has cached: earlier
chunks, prefix-cache pages and the chunk itself, all reached through the block table. A chunk
that starts at position 0 (a whole prompt) and one that starts after cached pages (chunked
prefill, prefix hit) are the same computation.

Kernel layout (FlashAttention-2 forward, one program per score tile):

- Grid `(q blocks, head groups, batch)`. One program owns `block_q // hp` query tokens of `hp`
  query heads that share one kv head (GQA), packed into one `[block_q, H]` tile whose row
  `t * hp + r` is token t of head r. Each K/V tile it loads therefore serves all `hp` heads,
  and the score tile stays `block_q` rows tall for any group size. q blocks are visited last to
  first, so the longest causal rows start first and short ones fill the tail.
- The inner loop walks KV blocks of `block_kv` tokens. Each row of a block finds its page in
  the block table (`page = table[b, tok // G]`) and the tile is gathered straight from the whole
  `[L, K, P, G, H]` pool at `[layer, kv_head, page, tok % G]`: no layer slice is copied, and a
  block may span several pages or part of one.
- Online softmax in base 2: the softmax scale times log2(e) is folded into one multiply-add
  before `exp2`; logits and the accumulator stay float32.
- Loop bounds follow the block's query positions: up to `max position + 1` (capped by the
  sequence length), from the sliding-window lower bound when there is a window. KV blocks every
  row of the tile sees in full skip the mask; only blocks on the diagonal, at the sequence end
  or at the window's edge pay for it (two static variants of one loop body).
- int8 / float8_e4m3fn pages are converted to the compute dtype as loaded (exact) and their
  per-page-per-head scales are applied to the logits (K) and to the probabilities (V) per
  column, so the matrix units still see 16-bit operands.

Speed (H100, jax 0.11.2, B=4 S=4096 causal 32/8 heads bf16, pages of 16, one run each):
head_dim 128: 366 TFLOP/s (JAX's Triton `mha` on contiguous K/V 364, Mosaic GPU FA3 591,
cuDNN 610); head_dim 64: 307 (mha 240, FA3 390, cuDNN 438). A contiguous-K/V build of this
kernel reached 376 at head_dim 128, so paging costs ~3% once the table lookup is prefetched;
the rest of the gap to cuDNN is what Triton through Pallas cannot express (asynchronous wgmma
overlapped with the softmax, warp specialization): DESIGN.md's 600 needs a Mosaic GPU kernel.

Robustness: keys past `seq_len` (stale or NaN-poisoned slots of the last page, pages a block
overhangs) are masked out of the logits and zeroed in V before `p @ V`, so garbage never
reaches the output. A row with nothing visible (a padding row, `seq_len == 0`) returns zeros.
Padding query tokens (positions past the sequence) get finite garbage, as callers ignore them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.paged_attention import paged_attention_reference

logger = logging.getLogger(__name__)

# Finite "minus infinity": masked logits and the running max start here, so exp2 of a
# difference never sees inf - inf (NaN), even for rows that have no visible key yet.
_MASK = -1e30
_LOG2E = math.log2(math.e)
_QUANTIZED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, slots=True)
class FlashTuning:
    """Tile sizes and Triton launch parameters of the prefill kernel.

    `block_q` counts score-tile rows: query tokens times the q heads packed with them (see the
    module docstring), so one value fits every GQA ratio. `block_kv` counts key tokens per
    inner step; it need not match the page size (a block gathers `block_kv / G` pages, or part
    of one), so one tuning serves every page size. Fields left None take the H100 choice for
    the head dim (`for_head_dim`), measured with `jaxinfer/kernel_bench/prefill.py`.
    """

    block_q: int = 128
    block_kv: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    pack_heads: bool = True  # one program per (kv head, q block) instead of per q head

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv", "num_warps"):
            v = getattr(self, name)
            if v is not None and not _is_pow2(v):
                raise ValueError(f"FlashTuning.{name} must be a power of two, got {v}")
        if self.block_q < 16 or (self.block_kv or 16) < 16:
            raise ValueError(f"FlashTuning block_q and block_kv must be >= 16 (matrix-unit "
                             f"tiles), got {self.block_q}, {self.block_kv}")
        if self.num_stages is not None and self.num_stages < 1:
            raise ValueError(f"FlashTuning.num_stages must be >= 1, got {self.num_stages}")

    def for_head_dim(self, head_dim: int, itemsize: int = 2) -> FlashTuning:
        """This tuning with every None field set to the H100 choice for `head_dim` and
        compute dtypes of `itemsize` bytes (4-byte tiles halve block_kv to fit shared memory)."""
        block_kv, warps, stages = _H100_CHOICE[128 if head_dim >= 128 else 64]
        if self.block_kv is None:
            while block_kv > 16 and 2 * block_kv * head_dim * itemsize * stages > _SMEM_BUDGET:
                block_kv //= 2
        return dataclasses.replace(
            self, block_kv=self.block_kv or block_kv, num_warps=self.num_warps or warps,
            num_stages=self.num_stages or stages)


# head_dim -> (block_kv, num_warps, num_stages), B=4 S=4096 causal 32/8 heads bf16 on H100
# with block_q 128 (361 and 309 TFLOP/s; JAX's Triton mha 363 and 239 in the same run).
_H100_CHOICE = {128: (128, 8, 3), 64: (64, 4, 3)}
# Shared memory the K and V pipeline stages may take (H100: 227 KiB per block, minus q and
# layout-conversion scratch); float32 tiles at head_dim 128 overflowed it with block_kv 128.
_SMEM_BUDGET = 192 * 1024
DEFAULT = FlashTuning()


def _flash_kernel(layer_ref, seq_ref, bt_ref, pos_ref, q_ref, k_ref, v_ref, *rest,
                  scale_log2: float, window: int | None, block_kv: int, page_size: int,
                  group: int, heads: int, max_len: int, compute_dtype, precision,
                  quantized: bool):
    """One program: `heads` q heads x `bq` query tokens of batch row b against its pages.

    layer_ref [1] i32; seq_ref [B] i32; bt_ref [B, Wp] i32; pos_ref [bq] i32;
    q_ref / o_ref [bq, heads, H]; k_ref / v_ref [L, K, P, G, H]; ks_ref / vs_ref [L, K, P].
    """
    if quantized:
        ks_ref, vs_ref, o_ref = rest
    else:
        (o_ref,) = rest
    b = pl.program_id(2)
    kv_head = lax.div(pl.program_id(1) * heads, group)
    bq, _, head_dim = q_ref.shape
    rows = bq * heads
    layer = layer_ref[0]
    seq_len = jnp.minimum(seq_ref[b], max_len)

    pos = pos_ref[...]  # [bq]
    row_pos = jnp.broadcast_to(pos[:, None], (bq, heads)).reshape(rows)  # [rows]
    pos_lo, pos_hi = jnp.min(pos), jnp.max(pos)
    q = q_ref[...].reshape(rows, head_dim).astype(compute_dtype)

    # Unquantized: logits stay unscaled and scale_log2 rides in the exp2 argument (one FMA).
    # Quantized: the per-column K scale is multiplied in anyway, so scale_log2 joins it.
    col_mult = 1.0 if quantized else scale_log2

    shift = page_size.bit_length() - 1  # page_size is a power of two (EngineConfig)
    last_entry = bt_ref.shape[1] - 1

    def block_pages(kb):  # [bkv] page of each key row of KV block kb
        tok = kb * block_kv + lax.iota(jnp.int32, block_kv)
        return bt_ref[b, jnp.minimum(lax.shift_right_logical(tok, shift), last_entry)]

    def step(kb, carry, masked: bool):
        acc, m_prev, l_prev, page = carry
        # The next block's page ids are fetched one step ahead: the K/V addresses then depend
        # only on the carry, which keeps the table lookup off the pipelined loads' path.
        next_page = block_pages(kb + 1)
        tok = kb * block_kv + lax.iota(jnp.int32, block_kv)  # [bkv] key positions
        kv_ok = tok < seq_len
        if masked:  # never follow table entries past the sequence
            page = jnp.where(kv_ok, page, 0)
        slot = tok & (page_size - 1)
        k = k_ref[layer, kv_head, page, slot, :]  # [bkv, H]
        v = v_ref[layer, kv_head, page, slot, :]
        k = k.astype(compute_dtype)
        v = v.astype(compute_dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # [rows, bkv]
        if quantized:
            s = s * (ks_ref[layer, kv_head, page] * scale_log2)[None, :]
        if masked:
            visible = (tok[None, :] <= row_pos[:, None]) & kv_ok[None, :]
            if window is not None:
                visible &= tok[None, :] > row_pos[:, None] - window
            s = jnp.where(visible, s, _MASK)
            v = jnp.where(kv_ok[:, None], v, jnp.zeros_like(v))
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1) * col_mult)
        p = jnp.exp2(s * col_mult - m_next[:, None])  # [rows, bkv]
        alpha = jnp.exp2(m_prev - m_next)
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        if quantized:
            v_scale = vs_ref[layer, kv_head, page]  # [bkv]
            if masked:
                v_scale = jnp.where(kv_ok, v_scale, 0.0)
            p = p * v_scale[None, :]
        pv = lax.dot_general(p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_next, l_next, next_page

    # KV block ranges. Rows see keys in (pos - window, pos] and below seq_len. Blocks in
    # [full_lo, full_hi) are seen whole by every row of this tile; the rest need the mask.
    hi = jnp.clip(pos_hi + 1, 0, seq_len)
    kb_hi = lax.div(hi + block_kv - 1, block_kv)
    kb_full_hi = lax.div(jnp.clip(pos_lo + 1, 0, seq_len), block_kv)
    if window is not None:
        kb_lo = lax.div(jnp.maximum(pos_lo - window + 1, 0), block_kv)
        kb_full_lo = lax.div(jnp.maximum(pos_hi - window + 1, 0) + block_kv - 1, block_kv)
    else:
        kb_lo = kb_full_lo = jnp.int32(0)
    b1 = jnp.minimum(jnp.maximum(kb_full_lo, kb_lo), kb_hi)
    b2 = jnp.minimum(jnp.maximum(kb_full_hi, b1), kb_hi)

    carry = (jnp.zeros((rows, head_dim), jnp.float32),
             jnp.full((rows,), _MASK, jnp.float32),
             jnp.zeros((rows,), jnp.float32),
             block_pages(kb_lo))  # each loop starts where the previous one stopped
    masked_step = functools.partial(step, masked=True)
    if window is not None:
        carry = lax.fori_loop(kb_lo, b1, masked_step, carry)
    carry = lax.fori_loop(b1, b2, functools.partial(step, masked=False), carry)
    acc, _, l_sum, _ = lax.fori_loop(b2, kb_hi, masked_step, carry)
    out = acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    o_ref[...] = out.reshape(bq, heads, head_dim).astype(o_ref.dtype)


def _heads_per_program(group: int, cfg: FlashTuning) -> int:
    """q heads packed into one program: the largest power of two dividing the group size."""
    if not cfg.pack_heads:
        return 1
    return min(group & -group, cfg.block_q)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "cfg", "interpret"))
def flash_prefill_attention(
    q: jax.Array,  # [B, T, N, H] bf16/f16/f32
    k_pages: jax.Array,  # [L, K, P, G, H] bf16/f16/f32, or int8/float8_e4m3fn with scales
    v_pages: jax.Array,  # [L, K, P, G, H]
    layer: jax.Array | int,  # int32 scalar: which layer of the pool
    block_tables: jax.Array,  # [B, W] int32 page ids
    seq_lens: jax.Array,  # [B] int32 cached tokens per sequence, this chunk included
    positions: jax.Array,  # [B, T] int32 absolute position of each query token
    *,
    k_scale: jax.Array | None = None,  # [L, K, P] float32, quantized pages only
    v_scale: jax.Array | None = None,  # [L, K, P] float32
    scale: float,
    sliding_window: int | None = None,
    cfg: FlashTuning = DEFAULT,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of a prefill chunk over its sequences' pages -> [B, T, N, H], q's dtype.

    Query t of row b sees cached keys at positions p with p <= positions[b, t],
    p < seq_lens[b] and, with a window, p > positions[b, t] - sliding_window. Rows with
    seq_lens 0 give zeros. With int8/float8_e4m3fn pages, `k_scale`/`v_scale` are required and
    a key is `page value * scale[layer, kv_head, page]`. Same numbers as
    `flash_prefill_attention_reference` up to float rounding.
    """
    b, t, n, h = q.shape
    num_layers, kv_heads, num_pages, page_size, hk = k_pages.shape
    if v_pages.shape != k_pages.shape or hk != h:
        raise ValueError(f"k_pages {k_pages.shape} / v_pages {v_pages.shape} do not fit q "
                         f"{q.shape}")
    if n % kv_heads:
        raise ValueError(f"{n} query heads are not a multiple of {kv_heads} kv heads")
    if block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables {block_tables.shape} must be [B={b}, W]")
    if seq_lens.shape != (b,) or positions.shape != (b, t):
        raise ValueError(f"seq_lens {seq_lens.shape} / positions {positions.shape} must be "
                         f"[{b}] / [{b}, {t}]")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    quantized = jnp.dtype(k_pages.dtype) in _QUANTIZED
    if quantized != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError(f"{k_pages.dtype} pages need k_scale and v_scale exactly when "
                         "quantized (int8/float8_e4m3fn)")
    if quantized and (k_scale.shape != (num_layers, kv_heads, num_pages)
                      or v_scale.shape != k_scale.shape):
        raise ValueError(f"k_scale {k_scale.shape} / v_scale {v_scale.shape} must be "
                         f"[L, K, P] = {(num_layers, kv_heads, num_pages)}")
    if not _is_pow2(page_size):
        raise ValueError(f"page size {page_size} is not a power of two")
    if not interpret and not _is_pow2(h):
        raise ValueError(f"head_dim {h} is not a power of two (Triton tiles need one)")

    if quantized:
        compute_dtype = jnp.dtype(q.dtype)
    else:
        compute_dtype = jnp.promote_types(q.dtype, k_pages.dtype)
    cfg = cfg.for_head_dim(h, compute_dtype.itemsize)
    group = n // kv_heads
    heads = _heads_per_program(group, cfg)
    # Query tokens per program: fill block_q rows, but no more tokens than the chunk has, and
    # at least 16 rows (the smallest matrix-unit tile).
    bq = max(min(cfg.block_q // heads, pl.next_power_of_2(t)), -(-16 // heads))
    t_pad = -(-t // bq) * bq
    if t_pad != t:  # padded queries sit at position -1: they see nothing and are dropped
        q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
        positions = jnp.pad(positions, ((0, 0), (0, t_pad - t)), constant_values=-1)
    width = block_tables.shape[1]
    max_len = width * page_size
    # The last KV block may overhang the table; pad it so every gather stays in bounds.
    width_pad = -(-(-(-max_len // cfg.block_kv) * cfg.block_kv) // page_size)
    if width_pad > width:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, width_pad - width)))

    precision = (lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None)
    kernel = functools.partial(
        _flash_kernel, scale_log2=scale * _LOG2E, window=sliding_window,
        block_kv=cfg.block_kv, page_size=page_size, group=group, heads=heads, max_len=max_len,
        compute_dtype=compute_dtype, precision=precision, quantized=quantized)
    nq = t_pad // bq
    grid = (nq, n // heads, b)

    def q_map(i, hb, bi):  # longest causal rows first
        return bi, nq - 1 - i, hb, 0

    whole = pl.BlockSpec()
    in_specs = [whole, whole, whole,
                pl.BlockSpec((None, bq), lambda i, hb, bi: (bi, nq - 1 - i)),
                pl.BlockSpec((None, bq, heads, h), q_map),
                whole, whole]
    args = [jnp.asarray(layer, jnp.int32).reshape(1), seq_lens.astype(jnp.int32),
            block_tables.astype(jnp.int32), positions.astype(jnp.int32), q, k_pages, v_pages]
    if quantized:
        in_specs += [whole, whole]
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, heads, h), q_map),
        out_shape=jax.ShapeDtypeStruct((b, t_pad, n, h), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="flash_prefill_attention",
    )(*args)
    return out[:, :t] if t_pad != t else out


def flash_prefill_attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [L, K, P, G, H]
    v_pages: jax.Array,  # [L, K, P, G, H]
    layer: jax.Array | int,
    block_tables: jax.Array,  # [B, W] int32
    seq_lens: jax.Array,  # [B] int32
    positions: jax.Array,  # [B, T] int32
    *,
    k_scale: jax.Array | None = None,  # [L, K, P] float32
    v_scale: jax.Array | None = None,  # [L, K, P] float32
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain-JAX reference with the kernel's arguments (minus tuning) -> [B, T, N, H]."""
    return paged_attention_reference(q, k_pages, v_pages, layer, block_tables, seq_lens,
                                     positions, k_scale=k_scale, v_scale=v_scale, scale=scale,
                                     sliding_window=sliding_window)
