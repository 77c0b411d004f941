"""Group-wise int4 weight matmul (Pallas, Triton lowering) beside its plain-jnp reference, and
the one int4 packing they both read.

Weights are asymmetric int4 in groups of `group` rows of the contraction dim K: row k of output
column n stands for `(q[n, k] - zero[k // group, n]) * scale[k // group, n]`, with q in 0..15
(AWQ's and GPTQ's convention). The layout is K-contiguous, `[N, K / 2]` uint8 (`[L, N, K / 2]`
stacked), two values per byte, packed per *unit* of `group` rows: within a unit of u rows
starting at k0, byte k0 / 2 + i holds row k0 + i in its low nibble and row k0 + u / 2 + i in its
high nibble (i < u / 2). A last unit shorter than `group` (K not a multiple of it, e.g. a
448-wide FFN) is packed the same way over its own u rows and has its own scale row, so every
group is `group` rows except possibly the last. Packing in halves of a unit, not in adjacent
pairs, lets the kernel unpack a tile with one mask and one shift into two [bn, u / 2] halves that
meet x's two column halves in two plain dots: no interleaving in registers. A unit never
crosses a group, so a tp split of K at a group boundary is also a split of the packed bytes.

`int4_matmul`: one program per [bm, bn] output tile walks K one group at a time: it loads the
packed [bn, group / 2] bytes, the group's zero points and scales for its columns, forms
`q - zero` (exact in bf16: -15..15) in x's dtype, runs the two dots with float32 accumulation
and adds them times the scales. The weight is streamed once per row tile and never dequantized
in memory; a stacked weight is read in place at `layer` (inside the model's layer scan a sliced
operand would be copied out of the stack every layer). Masked loads handle M, N and the last
unit, so any shape with even K is correct.

At decode (M <= `small_m_max`) one row tile covers all of M, so the weight is streamed once,
and, as in `qmatmul`'s decode plan, a weight with few columns gets narrower column tiles and
then its groups split over 2, 4, ... programs (float32 partials summed by XLA) until about
`min_programs` programs stream it: at 128-wide tiles the 1B shape's k/v projection (N = 512)
was 4 programs on a GPU of 132 SMs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.qmatmul import spread_decode

INT4_MAX = 15
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True, slots=True)
class Int4Tuning:
    """Tile sizes and launch parameters. K is always stepped by the group."""

    block_m: int = 16  # rows of x per program above small_m_max (>= 16, Triton's dot minimum)
    block_n: int = 128  # output columns per program (before the decode plan narrows it)
    num_warps: int = 4
    num_stages: int = 3
    small_m_max: int = 64  # up to this M one row tile covers all rows
    # Decode only: narrow the column tiles (down to 64), then split the groups in two, four,
    # ... (up to max_split) until there are at least this many programs (0: as given). Two per
    # H200 SM: each program's groups are few and small, so more of them hide load latency (the
    # 1B q projection: 8.1 us at 100, 6.0 us at 264, M = 1; benchmarks/quant_tuning_probe.py).
    min_programs: int = 264
    max_split: int = 8


DEFAULT = Int4Tuning()


# -- packing (the one int4 layout) -----------------------------------------------------------------

def _units(k: int, group: int) -> tuple[int, int]:
    """(full units of `group` rows, rows of the short last unit) of a contraction size k."""
    if group <= 0 or group % 2:
        raise ValueError(f"int4 group must be a positive even number, got {group}")
    if k % 2:
        raise ValueError(f"int4 packing needs an even contraction size, got {k}")
    return k // group, k % group


def num_groups(k: int, group: int) -> int:
    """Scale rows of a contraction size k: every group of `group` rows and a short last one."""
    full, tail = _units(k, group)
    return full + (tail > 0)


def pack_int4(q: jax.Array, group: int) -> jax.Array:
    """q [..., K] integers in 0..15 -> [..., K / 2] uint8 in the unit layout above."""
    k = q.shape[-1]
    full, tail = _units(k, group)
    q = q.astype(jnp.uint8)
    lead = q.shape[:-1]
    parts = []
    if full:
        u = q[..., :full * group].reshape(*lead, full, 2, group // 2)
        parts.append((u[..., 0, :] | (u[..., 1, :] << 4)).reshape(*lead, full * group // 2))
    if tail:
        u = q[..., full * group:].reshape(*lead, 2, tail // 2)
        parts.append(u[..., 0, :] | (u[..., 1, :] << 4))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def unpack_int4(packed: jax.Array, group: int) -> jax.Array:
    """Inverse of `pack_int4`: [..., K / 2] uint8 -> [..., K] int32 in 0..15."""
    k = 2 * packed.shape[-1]
    full, tail = _units(k, group)
    p = packed.astype(jnp.int32)
    lead = p.shape[:-1]
    parts = []
    if full:
        u = p[..., :full * group // 2].reshape(*lead, full, 1, group // 2)
        parts.append(jnp.concatenate([u & 15, u >> 4], axis=-2).reshape(*lead, full * group))
    if tail:
        u = p[..., full * group // 2:]
        parts.append(jnp.concatenate([u & 15, u >> 4], axis=-1))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def dequantize_int4(packed: jax.Array, scale: jax.Array, zero: jax.Array, group: int,
                    dtype=jnp.float32, *, g_idx: jax.Array | None = None) -> jax.Array:
    """The float weight [..., N, K] that packed [..., N, K / 2] with scale and zero
    [..., G, N] (G = `num_groups(K, group)`) stand for. `g_idx` [..., K] int32 (GPTQ's
    act-order) gives each row's group; without it row k is in group k // group."""
    q = unpack_int4(packed, group)  # [..., N, K]
    k = q.shape[-1]
    if g_idx is None:
        def rows(a):  # [..., G, N] -> [..., N, K]
            return jnp.swapaxes(jnp.repeat(a, group, axis=-2)[..., :k, :], -1, -2)
    else:
        def rows(a):
            return jnp.swapaxes(jnp.take_along_axis(a, g_idx[..., :, None], axis=-2), -1, -2)
    w = (q - rows(zero.astype(jnp.int32))).astype(jnp.float32) * rows(scale.astype(jnp.float32))
    return w.astype(dtype)


# -- reference ------------------------------------------------------------------------------------

def _layer_of(w, scale, zero, layer):
    if w.ndim == 3:
        if layer is None:
            raise ValueError(f"stacked weight {w.shape} needs a layer index")
        return w[layer], scale[layer], zero[layer]
    if layer is not None:
        raise ValueError(f"layer given for an unstacked weight {w.shape}")
    return w, scale, zero


def _check(x, w_q, scale, zero, group, has_g_idx: bool = False) -> tuple[int, int, int]:
    if x.ndim != 2 or w_q.ndim not in (2, 3):
        raise ValueError(f"x must be 2-D and w_q 2-D (or 3-D stacked), got {x.shape} and "
                         f"{w_q.shape}")
    m, k = x.shape
    n, kw = w_q.shape[-2], 2 * w_q.shape[-1]
    if kw != k:
        raise ValueError(f"contraction mismatch: x {x.shape}, packed w_q {w_q.shape} "
                         f"(K / 2 bytes per column)")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be bf16/f16/f32, got {x.dtype}")
    if w_q.dtype != jnp.uint8:
        raise ValueError(f"w_q must be uint8 (two int4 per byte), got {w_q.dtype}")
    lead = w_q.shape[:1] if w_q.ndim == 3 else ()
    want = (*lead, num_groups(k, group), n)
    for name, a in (("scale", scale), ("zero", zero)):
        if tuple(a.shape) != want and not (has_g_idx and a.shape[:len(lead)] == lead
                                           and a.shape[-1] == n):
            raise ValueError(f"{name} must be {list(want)}, got {list(a.shape)}")
    return m, k, n


def int4_matmul_reference(
    x: jax.Array,  # [M, K] bf16/f16/f32
    w_q: jax.Array,  # [N, K / 2] uint8 packed, or [L, N, K / 2] stacked
    scale: jax.Array,  # [G, N] f32 ([L, G, N] stacked), G = ceil(K / group)
    zero: jax.Array,  # [G, N] int8 zero points in 0..15 ([L, G, N] stacked)
    *,
    group: int,
    layer: jax.Array | int | None = None,  # int32 scalar: which layer of a stacked weight
    out_dtype=None,
    g_idx: jax.Array | None = None,  # [K] int32 ([L, K] stacked): GPTQ act-order row groups
) -> jax.Array:
    """x @ dequantize_int4(w_q, scale, zero).T with float32 accumulation -> [M, N] in
    `out_dtype` (default x's dtype). The kernel has no `g_idx`: act-order weights run here."""
    _check(x, w_q, scale, zero, group, g_idx is not None)
    if g_idx is not None and w_q.ndim == 3:
        g_idx = g_idx[layer]
    w_q, scale, zero = _layer_of(w_q, scale, zero, layer)
    w = dequantize_int4(w_q, scale, zero, group, g_idx=g_idx)  # [N, K] f32
    acc = jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)
    return acc.astype(out_dtype or x.dtype)


# -- kernel ---------------------------------------------------------------------------------------

def _pow2_at_least_16(x: int) -> int:
    return max(16, pl.next_power_of_2(x))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shape of one launch."""

    bm: int
    bn: int
    split: int  # programs along K per column tile (each takes `steps` whole groups)
    steps: int  # full groups per program
    tail: int  # rows of a short last group (only when split == 1)


def _plan(m: int, n: int, k: int, group: int, cfg: Int4Tuning) -> _Plan:
    decode = m <= cfg.small_m_max
    bm = _pow2_at_least_16(m) if decode else min(cfg.block_m, _pow2_at_least_16(m))
    bn = min(cfg.block_n, _pow2_at_least_16(n))
    full, tail = k // group, k % group
    split = 1
    if decode and cfg.min_programs:
        bn, split = spread_decode(n, bn, full, tail, split, cfg.min_programs, cfg.max_split)
    return _Plan(bm=bm, bn=bn, split=split, steps=full // split, tail=tail)


def _int4_kernel(layer_ref, x_ref, w_ref, s_ref, z_ref, o_ref, *, m: int, n: int, k: int,
                 p: _Plan, group: int, compute_dtype):
    """One [bm, bn] output tile, or with a split its partial sum over `p.steps` groups.

    layer_ref [1] i32; x_ref [bm, K] block; w_ref the whole packed stack [L, N, K / 2] uint8;
    s_ref [L, G, N] f32 and z_ref [L, G, N] int8 whole; o_ref [bm, bn] block ([1, bm, bn] of
    the float32 partials with a split, squeezed)."""
    layer = layer_ref[0]
    bm, bn = p.bm, p.bn
    n0 = pl.program_id(1) * bn
    g_first = pl.program_id(2) * p.steps
    row_ok = None if m % bm == 0 else (pl.program_id(0) * bm + jnp.arange(bm)) < m
    col_ok = None if n % bn == 0 else (n0 + jnp.arange(bn)) < n
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    def both(a, b):
        if a is None:
            return b
        return a if b is None else a & b

    def unit(acc, g, k0, half, width):
        """Add unit `g` (rows k0 .. k0 + 2 * half, loaded `width` >= half wide) to acc."""
        k_ok = None if width == half else jnp.arange(width) < half
        x_mask = both(None if row_ok is None else row_ok[:, None],
                      None if k_ok is None else k_ok[None, :])
        other = None if x_mask is None else 0.0
        x_lo = pltriton.load(x_ref.at[:, pl.ds(k0, width)], mask=x_mask, other=other)
        x_hi = pltriton.load(x_ref.at[:, pl.ds(k0 + half, width)], mask=x_mask, other=other)
        w_mask = both(None if col_ok is None else col_ok[:, None],
                      None if k_ok is None else k_ok[None, :])
        w = pltriton.load(w_ref.at[layer, pl.ds(n0, bn), pl.ds(k0 // 2, width)], mask=w_mask,
                          other=None if w_mask is None else 0).astype(jnp.int32)  # [bn, width]
        z = pltriton.load(z_ref.at[layer, g, pl.ds(n0, bn)], mask=col_ok,
                          other=None if col_ok is None else 0).astype(jnp.int32)  # [bn]
        s = pltriton.load(s_ref.at[layer, g, pl.ds(n0, bn)], mask=col_ok,
                          other=None if col_ok is None else 0.0)
        lo = ((w & 15) - z[:, None]).astype(compute_dtype)  # exact: -15..15
        hi = ((w >> 4) - z[:, None]).astype(compute_dtype)
        part = (pltriton.dot(x_lo, lo, trans_b=True, precision=precision)
                + pltriton.dot(x_hi, hi, trans_b=True, precision=precision))  # f32 [bm, bn]
        return acc + part * s[None, :]

    def step(i, acc):
        g = g_first + i
        return unit(acc, g, pl.multiple_of(g * group, group), group // 2, group // 2)

    acc = lax.fori_loop(0, p.steps, step, jnp.zeros((bm, bn), jnp.float32))
    if p.tail:  # the short last unit (split == 1): its own scale row, loads padded to 2^n
        full = k // group
        acc = unit(acc, jnp.int32(full), jnp.int32(full * group), p.tail // 2,
                   _pow2_at_least_16(p.tail // 2))
    out_mask = both(None if row_ok is None else row_ok[:, None],
                    None if col_ok is None else col_ok[None, :])
    pltriton.store(o_ref.at[:, :], acc.astype(o_ref.dtype), mask=out_mask)


@functools.partial(jax.jit, static_argnames=("group", "out_dtype", "cfg", "interpret"))
def int4_matmul(
    x: jax.Array,  # [M, K] bf16/f16/f32
    w_q: jax.Array,  # [N, K / 2] uint8 packed, or [L, N, K / 2] stacked
    scale: jax.Array,  # [G, N] f32 ([L, G, N] stacked), G = ceil(K / group)
    zero: jax.Array,  # [G, N] int8 zero points in 0..15 ([L, G, N] stacked)
    *,
    group: int,
    layer: jax.Array | int | None = None,  # int32 scalar: which layer of a stacked weight
    out_dtype=None,
    cfg: Int4Tuning = DEFAULT,
    interpret: bool = False,
) -> jax.Array:
    """Weight-only group-wise int4 matmul: `int4_matmul_reference` computed by the kernel.
    `group` (the packing unit too) must be a power of two >= 32 so that each half unit is a
    Triton block (>= 16, a power of two)."""
    m, k, n = _check(x, w_q, scale, zero, group)
    if group < 32 or group & (group - 1):
        raise ValueError(f"kernel group size must be a power of two >= 32, got {group}")
    if w_q.ndim == 2:  # one layer: a stack of one (free reshapes)
        if layer is not None:
            raise ValueError(f"layer given for an unstacked weight {w_q.shape}")
        w_q, scale, zero, layer = w_q[None], scale[None], zero[None], 0
    elif layer is None:
        raise ValueError(f"stacked weight {w_q.shape} needs a layer index")
    p = _plan(m, n, k, group, cfg)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    kernel = functools.partial(_int4_kernel, m=m, n=n, k=k, p=p, group=group,
                               compute_dtype=x.dtype)
    whole = pl.BlockSpec()
    if p.split == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
        out_spec = pl.BlockSpec((p.bm, p.bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((p.split, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, p.bm, p.bn), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, p.bm), pl.cdiv(n, p.bn), p.split),
        in_specs=[whole, pl.BlockSpec((p.bm, k), lambda i, j, s: (i, 0)), whole, whole, whole],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="int4_matmul",
    )(jnp.asarray(layer, jnp.int32).reshape(1), x, w_q, scale.astype(jnp.float32),
      zero.astype(jnp.int8))
    if p.split > 1:
        out = out.sum(axis=0).astype(out_dtype)
    return out
