"""Quantized weight matmuls (Pallas, Triton lowering), each beside a plain-jnp reference.

`int8_matmul`: weight-only int8. x [M, K] (bf16/f16/f32) times int8 weights with float32 scales,
either one per output column ([N]) or one per group of `group` rows of K per column
([K/group, N]). The kernel loads int8 tiles and converts them in registers to x's dtype (exact:
every int8 value is a bf16), runs the tensor-core dot with float32 accumulation, and applies the
scales to the accumulator: once at the end per channel, after each K-block of `group` rows
group-wise. Weights are never dequantized in memory.

`dense_matmul`: the same kernel for a float weight (no conversion, no scales), so that a layer
of a stacked bf16 weight is read in place too.

`fp8_matmul`: W8A8 with float8_e4m3fn weights (per-column scales) and activations quantized per
token (row amax / 448) just before the kernel. Both operands of the dot are e4m3, which Triton
lowers to Hopper's fp8 tensor cores; the float32 accumulator is scaled by
`row_scale * col_scale`. `fp8_gemm` is the same kernel for activations quantized by the caller.

Two regimes share one kernel body:
- decode (M <= `small_m_max`): one row tile covers all of M (padded to the 16-row dot minimum
  by masked loads, never in memory), so the weight is streamed exactly once; N is split over
  many programs and, optionally, K over `split_k` programs whose float32 partials are summed
  by XLA afterwards. This regime is bound by weight bandwidth.
- prefill (larger M): a tiled matmul over a 1-D grid in grouped order (`group_m` row tiles
  walk the same column tiles, so weight tiles are reused from L2).

Weights come in two layouts: `[K, N]` (the einsum layout, `transposed=False`) or `[N, K]`
(`transposed=True`, K contiguous, as torch's Linear stores them). On an H100 the `[N, K]` layout
is faster for both kinds (int8 decode 23 vs 27 us at M=16, K=4096, N=14336; Hopper's fp8 MMA
wants K-major operands), so `jaxinfer.quant` stores weights that way. A weight may also be a
stack `[L, ...]` of layers with a `layer` index: the kernel reads that layer in place, because
inside the model's layer scan a sliced operand would be copied out of the stack every step.
`swap_ab` computes w^T x^T instead (the weight tile as the MMA's left operand); it is a tuning
knob, off by default until measured.

Tails (M, N or K not a multiple of the block) are handled with masked loads and stores, so any
shape is correct; the fast paths are multiples of the blocks. Block sizes are powers of two and
at least 16 (Triton's dot minimum), shrunk to the problem where it is smaller.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True, slots=True)
class MatmulBlocks:
    """Tile sizes and launch parameters of one regime."""

    block_m: int  # rows of x per program (decode: ignored; one tile covers M)
    block_n: int  # output columns per program
    block_k: int  # contraction step (group-wise int8 always steps by the group)
    split_k: int = 1  # programs per column tile along K (decode); partials summed by XLA
    group_m: int = 8  # row tiles per L2 group in the tiled regime
    num_warps: int = 4
    num_stages: int = 3
    # Compute out^T = w^T x^T: the weight tile (converted in registers) is the dot's left
    # operand, which the tensor cores may take from registers, and the rows of x become the
    # MMA's narrow N side; the accumulator is transposed once before the store.
    swap_ab: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class QMatmulTuning:
    """Blocks for the weight-streaming decode regime (M <= small_m_max) and the tiled one."""

    small: MatmulBlocks
    large: MatmulBlocks
    small_m_max: int = 64
    # Decode only: narrow the column tiles (to 64) and then split K in two, four, ... (up to
    # max_split) until there are at least this many programs, so a weight with few columns
    # still streams on every SM (0: the blocks as given).
    min_programs: int = 0
    max_split: int = 2

    def blocks(self, m: int) -> MatmulBlocks:
        return self.small if m <= self.small_m_max else self.large


# H100 defaults (bench: jaxinfer/kernel_bench/qmatmul.py). Decode, measured on the [N, K]
# layout at K=4096, N=14336: 128 x 256 tiles stream the int8 weight at ~23 us for M = 1..16
# (XLA bf16: 39-43 us); split-K and 512-deep tiles were slower, 128 x 512 does not fit in
# shared memory with 4 stages.
# The decode plan (narrow tiles, then split K until ~100 programs) is the one `dense_matmul`
# measured best with: without it the 1B shape's projections ran on 4 (k/v, N = 512) to 64
# programs, and int8 decode of that model was 0.52x of bf16 end to end (1.07x with it, H200).
INT8_DEFAULT = QMatmulTuning(
    small=MatmulBlocks(block_m=16, block_n=128, block_k=256, split_k=1, num_warps=4,
                       num_stages=4),
    large=MatmulBlocks(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    min_programs=100,
    max_split=8,
)
# bf16 weights, decode (benchmarks/dense_tuning_probe.py, H200, the 8B layer's projections
# whole and per tp=2 shard, M = 1 and 32): 128 x 128 tiles are best where they make >= ~112
# programs (N = 14336: 4.1 TB/s); with fewer columns 64-wide tiles and a K split win (N = 4096,
# split 2: 2.0 -> 4.6 TB/s at M = 1, above XLA's dot on an unstacked weight, 4.4; N = 2048,
# split 4: 3.3 TB/s against 2.5 at split 2; N = 1024, split 8: 2.1 against 1.3).
DENSE_DEFAULT = QMatmulTuning(
    small=MatmulBlocks(block_m=16, block_n=128, block_k=128, split_k=1, num_warps=4,
                       num_stages=4),
    large=MatmulBlocks(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    min_programs=100,
    max_split=8,
)
FP8_DEFAULT = QMatmulTuning(
    small=MatmulBlocks(block_m=16, block_n=128, block_k=256, split_k=1, num_warps=4,
                       num_stages=4),
    large=MatmulBlocks(block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=3),
    min_programs=100,
    max_split=8,
)


# -- references ---------------------------------------------------------------------------------

def _kn(w: jax.Array, transposed: bool) -> jax.Array:
    return w.T if transposed else w


def _layer_of(w: jax.Array, scale: jax.Array, layer) -> tuple[jax.Array, jax.Array]:
    """The 2-D weight and its scales: layer `layer` of a stacked [L, ...] weight."""
    if w.ndim == 3:
        if layer is None:
            raise ValueError(f"stacked weight {w.shape} needs a layer index")
        return w[layer], scale[layer]
    if layer is not None:
        raise ValueError(f"layer given for an unstacked weight {w.shape}")
    return w, scale


def int8_matmul_reference(
    x: jax.Array,  # [M, K] bf16/f16/f32
    w_q: jax.Array,  # [K, N] int8 ([N, K] if transposed), or [L, ...] stacked
    scale: jax.Array,  # [N] f32, or [K / group, N] f32 when group is set ([L, ...] stacked)
    *,
    layer: jax.Array | int | None = None,  # int32 scalar: which layer of a stacked weight
    group: int | None = None,
    transposed: bool = False,
    out_dtype=None,
) -> jax.Array:
    """x @ (w_q * scale) with float32 accumulation -> [M, N] in `out_dtype` (default x's)."""
    _check_int8(x, w_q, scale, group, transposed)
    w_q, scale = _layer_of(w_q, scale, layer)
    out_dtype = out_dtype or x.dtype
    w = _kn(w_q, transposed).astype(x.dtype)  # exact: int8 values are representable
    if group is None:
        acc = jnp.dot(x, w, preferred_element_type=jnp.float32) * scale[None, :]
    else:
        # Per-group partial sums in float32 (exact products; a batched bf16 dot with a float32
        # result is not supported on every backend).
        m, k = x.shape
        xg = x.astype(jnp.float32).reshape(m, k // group, group)
        wg = w.astype(jnp.float32).reshape(k // group, group, -1)
        part = jnp.einsum("mgk,gkn->mgn", xg, wg, precision=jax.lax.Precision.HIGHEST)
        acc = jnp.einsum("mgn,gn->mn", part, scale.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    return acc.astype(out_dtype)


def quantize_rows_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (per-token) dynamic fp8 quantization of x [M, K] -> (x_q [M, K] float8_e4m3fn,
    x_scale [M] f32) with x ~= x_q * x_scale; an all-zero row gets scale 1."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    q = jnp.clip(x32 / scale[:, None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q, scale


def fp8_gemm_reference(
    x_q: jax.Array,  # [M, K] float8_e4m3fn
    x_scale: jax.Array,  # [M] f32
    w_q: jax.Array,  # [K, N] float8_e4m3fn ([N, K] if transposed), or [L, ...] stacked
    w_scale: jax.Array,  # [N] f32 ([L, N] stacked)
    *,
    layer: jax.Array | int | None = None,
    transposed: bool = False,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """(x_q @ w_q) * x_scale[:, None] * w_scale[None, :], float32 accumulation -> [M, N]."""
    _check_fp8(x_q, x_scale, w_q, w_scale, transposed)
    w_q, w_scale = _layer_of(w_q, w_scale, layer)
    acc = jnp.dot(x_q, _kn(w_q, transposed), preferred_element_type=jnp.float32)
    return (acc * x_scale[:, None] * w_scale[None, :]).astype(out_dtype)


def fp8_matmul_reference(
    x: jax.Array,  # [M, K] bf16/f16/f32
    w_q: jax.Array,  # [K, N] float8_e4m3fn ([N, K] if transposed), or [L, ...] stacked
    w_scale: jax.Array,  # [N] f32 ([L, N] stacked)
    *,
    layer: jax.Array | int | None = None,
    transposed: bool = False,
    out_dtype=None,
) -> jax.Array:
    """W8A8: x quantized per row to e4m3 (`quantize_rows_fp8`), then `fp8_gemm_reference`."""
    x_q, x_scale = quantize_rows_fp8(x)
    return fp8_gemm_reference(x_q, x_scale, w_q, w_scale, layer=layer, transposed=transposed,
                              out_dtype=out_dtype or x.dtype)


# -- validation ---------------------------------------------------------------------------------

def _dims(x: jax.Array, w: jax.Array, transposed: bool) -> tuple[int, int, int]:
    if x.ndim != 2 or w.ndim not in (2, 3):
        raise ValueError(f"x must be 2-D and w 2-D (or 3-D stacked), got {x.shape} and "
                         f"{w.shape}")
    m, k = x.shape
    kw, n = (w.shape[-1], w.shape[-2]) if transposed else w.shape[-2:]
    if kw != k:
        raise ValueError(f"contraction mismatch: x {x.shape}, w {w.shape} "
                         f"(transposed={transposed})")
    return m, k, n


def _check_scale(scale: jax.Array, w: jax.Array, want: tuple[int, ...], what: str) -> None:
    lead = w.shape[:1] if w.ndim == 3 else ()
    if scale.shape != (*lead, *want):
        raise ValueError(f"{what} scale must be {list((*lead, *want))}, got {list(scale.shape)}")


def _check_int8(x, w_q, scale, group, transposed) -> tuple[int, int, int]:
    m, k, n = _dims(x, w_q, transposed)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be bf16/f16/f32, got {x.dtype}")
    if w_q.dtype != jnp.int8:
        raise ValueError(f"w_q must be int8, got {w_q.dtype}")
    if group is None:
        _check_scale(scale, w_q, (n,), "per-channel")
    else:
        if group <= 0 or k % group:
            raise ValueError(f"group {group} must divide K={k}")
        _check_scale(scale, w_q, (k // group, n), "group")
    return m, k, n


def _check_fp8(x_q, x_scale, w_q, w_scale, transposed) -> tuple[int, int, int]:
    m, k, n = _dims(x_q, w_q, transposed)
    for name, a in (("x_q", x_q), ("w_q", w_q)):
        if a.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"{name} must be float8_e4m3fn, got {a.dtype}")
    if x_scale.shape != (m,):
        raise ValueError(f"x scale must be [{m}], got {list(x_scale.shape)}")
    _check_scale(w_scale, w_q, (n,), "weight")
    return m, k, n


# -- kernel -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shape of one launch."""

    m: int
    n: int
    k: int
    bm: int
    bn: int
    bk: int
    split: int  # programs along K per column tile
    steps: int  # full K blocks per program
    tail: int  # leftover K (< bk) handled by one masked step (only when split == 1)
    num_m: int
    num_n: int
    group_m: int
    num_stages: int


def _pow2_at_least_16(x: int) -> int:
    return max(16, pl.next_power_of_2(x))


# Shared memory a launch may plan for (an H100 block gets at most 227 KiB; Triton adds its own
# conversion and epilogue buffers, so stay well below).
SMEM_BUDGET = 200 * 1024


def _smem_estimate(bm: int, bn: int, bk: int, stages: int, x_bytes: int, w_bytes: int) -> int:
    """A conservative guess of Triton's shared memory for one program: `stages` buffers of the
    x and weight tiles, the weight also in x's dtype once the MMA reads it from shared memory
    (Triton does so from 64 rows on, seen on an H100), and a float32 epilogue tile."""
    converted = x_bytes if bm >= 64 and w_bytes < x_bytes else 0
    return stages * (bm * bk * x_bytes + bn * bk * (w_bytes + converted)) + bm * bn * 4


def _fit_smem(bm: int, bn: int, bk: int, stages: int, x_bytes: int, w_bytes: int,
              group: int | None) -> tuple[int, int, int]:
    """Shrink (stages, then bk unless it is the group, then bn) until the estimate fits, so a
    tuning that suits M = 16 still compiles at M = 64 (one row tile of 64)."""
    while _smem_estimate(bm, bn, bk, stages, x_bytes, w_bytes) > SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        elif group is None and bk > 32:
            bk //= 2
        elif bn > 16:
            bn //= 2
        else:
            break
    return bn, bk, stages


def spread_decode(n: int, bn: int, units: int, tail: int, split: int, min_programs: int,
                  max_split: int) -> tuple[int, int]:
    """The decode rule (also `int4_matmul`'s): narrow the column tiles down to 64, then split
    the `units` K steps in 2, 4, ... (up to `max_split`, evenly, never with a `tail`) until
    there are `min_programs` programs. -> (bn, split)."""
    while pl.cdiv(n, bn) * split < min_programs and bn > 64:
        bn //= 2
    while (pl.cdiv(n, bn) * split < min_programs and split < max_split and not tail
           and units % (2 * split) == 0):
        split *= 2
    return bn, split


def _plan(m: int, n: int, k: int, blocks: MatmulBlocks, small_m_max: int,
          group: int | None, x_bytes: int, w_bytes: int, min_programs: int = 0,
          max_split: int = 2) -> _Plan:
    if m <= small_m_max:
        bm = _pow2_at_least_16(m)  # one row tile: the weight is read once
    else:
        bm = min(blocks.block_m, _pow2_at_least_16(m))
    bn = min(blocks.block_n, _pow2_at_least_16(n))
    bk = group if group is not None else min(blocks.block_k, _pow2_at_least_16(k))
    bn, bk, stages = _fit_smem(bm, bn, bk, blocks.num_stages, x_bytes, w_bytes, group)
    full, tail = divmod(k, bk)
    split = blocks.split_k
    if m <= small_m_max and min_programs:
        bn, split = spread_decode(n, bn, full, tail, split, min_programs, max_split)
    if split > 1 and (tail or full % split):
        split = 1  # uneven splits are not worth masking: fall back to one program along K
    return _Plan(m=m, n=n, k=k, bm=bm, bn=bn, bk=bk, split=split, steps=full // split,
                 tail=tail, num_m=pl.cdiv(m, bm), num_n=pl.cdiv(n, bn),
                 group_m=blocks.group_m, num_stages=stages)


def _tile_ids(pid, p: _Plan):
    """Program id -> (row tile, column tile); grouped order when there are several row tiles."""
    if p.num_m == 1:
        return 0, pid
    width = p.group_m * p.num_n
    first_m = (pid // width) * p.group_m
    size = jnp.minimum(p.num_m - first_m, p.group_m)
    return first_m + (pid % width) % size, (pid % width) // size


def _and(a, b):
    if a is None:
        return b
    return a if b is None else a & b


def _matmul_kernel(layer_ref, x_ref, *refs, p: _Plan, group: int | None, transposed: bool,
                   has_x_scale: bool, has_scale: bool, compute_dtype, swap_ab: bool):
    """One [bm, bn] output tile (or a split-K partial of it).

    layer_ref [1] i32; x_ref [bm, K] block; xs_ref [bm] block (fp8); w_ref the whole stacked
    weight [L, K, N] ([L, N, K] transposed); s_ref the whole scales [L, N] / [L, K/g, N]
    (absent for a float weight); o_ref [bm, bn] block ([1, bm, bn] of the partials with
    split-K, squeezed).
    """
    refs = list(refs)
    xs_ref = refs.pop(0) if has_x_scale else None
    w_ref = refs.pop(0)
    s_ref = refs.pop(0) if has_scale else None
    (o_ref,) = refs
    layer = layer_ref[0]
    pid_m, pid_n = _tile_ids(pl.program_id(0), p)
    split = pl.program_id(1)
    n0 = pid_n * p.bn
    row_ok = None
    if p.m % p.bm:
        row_ok = (pid_m * p.bm + jnp.arange(p.bm)) < p.m
    col_ok = None
    if p.n % p.bn:
        col_ok = (n0 + jnp.arange(p.bn)) < p.n

    def zero(ref):  # `other` for masked loads, in a type Triton casts from
        return 0 if jnp.issubdtype(ref.dtype, jnp.integer) else 0.0

    def load_tiles(k0, k_ok):
        x_mask = _and(None if row_ok is None else row_ok[:, None],
                      None if k_ok is None else k_ok[None, :])
        x = pltriton.load(x_ref.at[:, pl.ds(k0, p.bk)], mask=x_mask,
                          other=None if x_mask is None else zero(x_ref))
        if transposed:  # a [bn, bk] tile of [N, K]
            w_mask = _and(None if col_ok is None else col_ok[:, None],
                          None if k_ok is None else k_ok[None, :])
            tile = w_ref.at[layer, pl.ds(n0, p.bn), pl.ds(k0, p.bk)]
        else:  # a [bk, bn] tile of [K, N]
            w_mask = _and(None if k_ok is None else k_ok[:, None],
                          None if col_ok is None else col_ok[None, :])
            tile = w_ref.at[layer, pl.ds(k0, p.bk), pl.ds(n0, p.bn)]
        w = pltriton.load(tile, mask=w_mask, other=None if w_mask is None else zero(w_ref))
        return x, w.astype(compute_dtype)

    # Triton's default dot precision rounds float32 inputs to TF32 (~1e-4 relative error, seen on
    # the H100); float32 activations ask for full IEEE products like the other kernels do.
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    # The accumulator is [bm, bn], or [bn, bm] with swap_ab; `cols`/`rows` broadcast a
    # per-column / per-row vector against it.
    if swap_ab:
        def dot(x, w):
            return pltriton.dot(w, x, trans_a=not transposed, trans_b=True, precision=precision)

        def cols(v):
            return v[:, None]

        def rows(v):
            return v[None, :]
    else:
        def dot(x, w):
            return pltriton.dot(x, w, trans_b=transposed, precision=precision)  # f32 accum.

        def cols(v):
            return v[None, :]

        def rows(v):
            return v[:, None]

    def col_scale(group_row):
        if group_row is None:
            ref = s_ref.at[layer, pl.ds(n0, p.bn)]
        else:
            ref = s_ref.at[layer, group_row, pl.ds(n0, p.bn)]
        return pltriton.load(ref, mask=col_ok, other=None if col_ok is None else 0.0)

    k_first = split * p.steps  # first K block of this program

    def step(i, acc):
        x, w = load_tiles((k_first + i) * p.bk, None)
        if group is None:
            return acc + dot(x, w)
        return acc + dot(x, w) * cols(col_scale(k_first + i))

    shape = (p.bn, p.bm) if swap_ab else (p.bm, p.bn)
    acc = jax.lax.fori_loop(0, p.steps, step, jnp.zeros(shape, jnp.float32))
    if p.tail:  # only with split == 1 (and never group-wise: the group divides K)
        k0 = (k_first + p.steps) * p.bk
        x, w = load_tiles(k0, (k0 + jnp.arange(p.bk)) < p.k)
        acc += dot(x, w)
    if group is None and s_ref is not None:
        acc = acc * cols(col_scale(None))
    if xs_ref is not None:
        acc = acc * rows(pltriton.load(xs_ref.at[:], mask=row_ok,
                                       other=None if row_ok is None else 0.0))
    if swap_ab:
        acc = acc.T
    out_mask = _and(None if row_ok is None else row_ok[:, None],
                    None if col_ok is None else col_ok[None, :])
    pltriton.store(o_ref.at[:, :], acc.astype(o_ref.dtype), mask=out_mask)


def _launch(x, x_scale, w, scale, layer, *, group, transposed, out_dtype,
            blocks: MatmulBlocks, small_m_max: int, interpret: bool, name: str,
            min_programs: int = 0, max_split: int = 2) -> jax.Array:
    if w.ndim == 2:  # one layer: a stack of one (free reshapes)
        if layer is not None:
            raise ValueError(f"layer given for an unstacked weight {w.shape}")
        w, layer = w[None], 0
        scale = None if scale is None else scale[None]
    elif layer is None:
        raise ValueError(f"stacked weight {w.shape} needs a layer index")
    m, k = x.shape
    n = w.shape[1] if transposed else w.shape[2]
    p = _plan(m, n, k, blocks, small_m_max, group, x.dtype.itemsize, w.dtype.itemsize,
              min_programs, max_split)

    def tm(pid):
        return _tile_ids(pid, p)[0]

    def tn(pid):
        return _tile_ids(pid, p)[1]

    whole = pl.BlockSpec()
    # The weight stack is passed whole and indexed in the kernel at `layer`: inside the
    # model's layer scan a sliced operand would be copied out of the stack every layer.
    in_specs = [whole, pl.BlockSpec((p.bm, k), lambda i, s: (tm(i), 0))]
    args = [jnp.asarray(layer, jnp.int32).reshape(1), x]
    if x_scale is not None:
        in_specs.append(pl.BlockSpec((p.bm,), lambda i, s: (tm(i),)))
        args.append(x_scale)
    in_specs.append(whole)
    args.append(w)
    if scale is not None:
        in_specs.append(whole)
        args.append(scale.astype(jnp.float32))
    if p.split == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
        out_spec = pl.BlockSpec((p.bm, p.bn), lambda i, s: (tm(i), tn(i)))
    else:
        out_shape = jax.ShapeDtypeStruct((p.split, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, p.bm, p.bn), lambda i, s: (s, tm(i), tn(i)))
    kernel = functools.partial(
        _matmul_kernel, p=p, group=group, transposed=transposed,
        has_x_scale=x_scale is not None, has_scale=scale is not None, swap_ab=blocks.swap_ab,
        compute_dtype=jnp.float8_e4m3fn if x_scale is not None else x.dtype)
    out = pl.pallas_call(
        kernel,
        grid=(p.num_m * p.num_n, p.split),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=p.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    if p.split > 1:
        out = out.sum(axis=0).astype(out_dtype)
    return out


@functools.partial(jax.jit, static_argnames=("group", "transposed", "out_dtype", "cfg",
                                             "interpret"))
def int8_matmul(
    x: jax.Array,  # [M, K] bf16/f16/f32
    w_q: jax.Array,  # [K, N] int8 ([N, K] if transposed), or [L, ...] stacked
    scale: jax.Array,  # [N] f32, or [K / group, N] f32 when group is set ([L, ...] stacked)
    *,
    layer: jax.Array | int | None = None,  # int32 scalar: which layer of a stacked weight
    group: int | None = None,
    transposed: bool = False,
    out_dtype=None,
    cfg: QMatmulTuning = INT8_DEFAULT,
    interpret: bool = False,
) -> jax.Array:
    """Weight-only int8 matmul: x @ (w_q * scale) -> [M, N] in `out_dtype` (default x's dtype),
    float32 accumulation. `group` (a power of two >= 16, e.g. 64 or 128) selects group-wise
    scales over K; None means one scale per output column. A stacked weight is read in place
    at `layer`."""
    m, k, n = _check_int8(x, w_q, scale, group, transposed)
    if group is not None and (group < 16 or group & (group - 1)):
        raise ValueError(f"kernel group size must be a power of two >= 16, got {group}")
    return _launch(x, None, w_q, scale, layer, group=group, transposed=transposed,
                   out_dtype=jnp.dtype(out_dtype or x.dtype), blocks=cfg.blocks(m),
                   small_m_max=cfg.small_m_max, interpret=interpret, name="int8_matmul",
                   min_programs=cfg.min_programs, max_split=cfg.max_split)


@functools.partial(jax.jit, static_argnames=("transposed", "out_dtype", "cfg", "interpret"))
def dense_matmul(
    x: jax.Array,  # [M, K] bf16/f16/f32
    w: jax.Array,  # [K, N] in x's dtype ([N, K] if transposed), or [L, ...] stacked
    *,
    layer: jax.Array | int | None = None,  # int32 scalar: which layer of a stacked weight
    transposed: bool = False,
    out_dtype=None,
    cfg: QMatmulTuning = DENSE_DEFAULT,
    interpret: bool = False,
) -> jax.Array:
    """x @ w for a float weight, float32 accumulation -> [M, N] in `out_dtype` (default x's
    dtype). The same streaming kernel as `int8_matmul` without the conversion and scales; its
    use is reading a layer of a stacked weight in place (`layer`), which XLA's dot cannot: in
    the model's layer loop XLA copies each layer's slice out of the stack first (measured on an
    H100, Llama-3.1-8B-shaped projections at batch 1: 9.4 of 15.1 ms per token in copies)."""
    m, k, n = _dims(x, w, transposed)
    if x.dtype not in _FLOAT_DTYPES or w.dtype != x.dtype:
        raise ValueError(f"x and w must share a float dtype, got {x.dtype} and {w.dtype}")
    return _launch(x, None, w, None, layer, group=None, transposed=transposed,
                   out_dtype=jnp.dtype(out_dtype or x.dtype), blocks=cfg.blocks(m),
                   small_m_max=cfg.small_m_max, interpret=interpret, name="dense_matmul",
                   min_programs=cfg.min_programs, max_split=cfg.max_split)


def dense_matmul_reference(x: jax.Array, w: jax.Array, *, layer=None, transposed: bool = False,
                           out_dtype=None) -> jax.Array:
    """x @ w[layer] (or x @ w) with float32 accumulation, in `out_dtype` (default x's)."""
    w = w[layer] if w.ndim == 3 else w
    return jnp.dot(x, _kn(w, transposed), preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST).astype(out_dtype or x.dtype)


@functools.partial(jax.jit, static_argnames=("transposed", "out_dtype", "cfg", "interpret"))
def fp8_gemm(
    x_q: jax.Array,  # [M, K] float8_e4m3fn
    x_scale: jax.Array,  # [M] f32
    w_q: jax.Array,  # [K, N] float8_e4m3fn ([N, K] if transposed), or [L, ...] stacked
    w_scale: jax.Array,  # [N] f32 ([L, N] stacked)
    *,
    layer: jax.Array | int | None = None,
    transposed: bool = False,
    out_dtype=jnp.bfloat16,
    cfg: QMatmulTuning = FP8_DEFAULT,
    interpret: bool = False,
) -> jax.Array:
    """fp8 x fp8 tensor-core matmul of pre-quantized operands, scaled per row and column."""
    m, _, _ = _check_fp8(x_q, x_scale, w_q, w_scale, transposed)
    return _launch(x_q, x_scale.astype(jnp.float32), w_q, w_scale, layer, group=None,
                   transposed=transposed, out_dtype=jnp.dtype(out_dtype), blocks=cfg.blocks(m),
                   small_m_max=cfg.small_m_max, interpret=interpret, name="fp8_matmul",
                   min_programs=cfg.min_programs, max_split=cfg.max_split)


@functools.partial(jax.jit, static_argnames=("transposed", "out_dtype", "cfg", "interpret"))
def fp8_matmul(
    x: jax.Array,  # [M, K] bf16/f16/f32
    w_q: jax.Array,  # [K, N] float8_e4m3fn ([N, K] if transposed), or [L, ...] stacked
    w_scale: jax.Array,  # [N] f32 ([L, N] stacked)
    *,
    layer: jax.Array | int | None = None,
    transposed: bool = False,
    out_dtype=None,
    cfg: QMatmulTuning = FP8_DEFAULT,
    interpret: bool = False,
) -> jax.Array:
    """W8A8: quantize x per row to e4m3 (one small XLA fusion), then `fp8_gemm`."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be bf16/f16/f32, got {x.dtype}")
    x_q, x_scale = quantize_rows_fp8(x)
    return fp8_gemm(x_q, x_scale, w_q, w_scale, layer=layer, transposed=transposed,
                    out_dtype=jnp.dtype(out_dtype or x.dtype), cfg=cfg, interpret=interpret)
