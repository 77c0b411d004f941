"""Quantized weights: the `QuantArray(q, scale)` type (STYLE.md rule 13) and the quantizers.

Modes (`--quant`): `int8` (weight-only, one float32 scale per output column), `int8-g64` /
`int8-g128` (weight-only, one scale per column per group of 64/128 rows of the contraction
dim), `fp8` (float8_e4m3fn weights with per-column scales; activations are quantized per token
at run time, W8A8), `int4-g128` (weight-only, asymmetric: 4-bit values with a float32 scale and
an integer zero point per column per group of 128 rows, two values per byte). int8 and fp8 are
symmetric: value ~= q * scale, with scale = amax / 127 (int8) or amax / 448 (fp8) over the
column (or group); an all-zero column gets scale 1. int4 is value ~= (q - zero) * scale with q
in 0..15, GPTQ's min/max rule (the range [min(w, 0), max(w, 0)] of the group over 15 steps, so
0 is exact) with a clipping search over shrunk ranges (`CLIP_SHRINKS`), the convention AWQ and
GPTQ checkpoints store (`checkpoints/gptq.py` loads those
into this same representation). int4 groups may end in a short last group when 128 does not
divide K (the demo model's 448-wide FFN): G = ceil(K / 128) scale rows.

Weights stay einsum-shaped. A weight `[*B, *C, *O]` has leading stacked dims B (`layers`),
contraction dims C and output dims O (wq `[L, D, N, H]`: B=1, C=1; wo `[L, N, H, D]`: C=2).
Quantization works along the flattened C with scales per flattened O; the matmul reshapes to
2-D `[K, N]` (free: C and O are contiguous). `q` keeps the float weight's layout, or, with
`transposed`, is `[*B, *O, *C]` (K contiguous), which the kernels stream faster on Hopper; the
storage layout per kind is `TRANSPOSED`. Scales are `[*B, *O]` per channel and
`[*B, K/group, *O]` group-wise, float32. int4 is always transposed and packed along K (the
layout of `pallas_kernels.int4_matmul.pack_int4`): q is uint8 `[*B, *O, *C']` where C' is C
with its last dim halved, and `zero` (int8, 0..15) has the scale's shape; other kinds have no
zero (None).

What is quantized is the model's choice (`jaxinfer.models.llama.quantized_weights`): the layer
projections always, an untied lm_head for int8 modes only, the embedding never (it is a gather
and, when tied, also the head). Logical axes follow the weight: `q` has the float weight's
axes (permuted when transposed), a scale the axes of the output dims, and the group axis the
name of the first contraction dim, so tensor-parallel sharding splits scales like the weight.

On disk (`checkpoints/`) a QuantArray is the dict `{"q": ..., "scale": ...}` (plus `"zero"`
for int4; `split_quant` / `join_quant`); kind, group and layout are in
`jaxinfer_checkpoint.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxinfer.config import QUANT_MODES  # defined there, JAX-free, for the server's flags
from jaxinfer.errors import ConfigError
from pallas_kernels.int4_matmul import INT4_MAX, dequantize_int4, num_groups, pack_int4

logger = logging.getLogger(__name__)


QuantKind = Literal["int8", "fp8", "int4"]
# Storage layout of q per kind: True = [*B, *O, *C] (K contiguous, as torch's Linear). Measured
# on an H100: the int8 decode kernel streams it faster (23 vs 27 us at M=16, K=4096,
# N=14336), and the fp8 tile kernel runs ~1.4x faster on it (Hopper's fp8 MMA reads K-major
# operands).
# int4 is packed along K, so only the K-contiguous layout exists for it.
TRANSPOSED: dict[str, bool] = {"int8": True, "fp8": True, "int4": True}
INT8_MAX = 127.0
FP8_MAX = 448.0
# Range shrinks int4's clipping search tries beside the full range (`quantize_int4`). On the
# demo model (bench quality) 1/40 steps to 0.7 gave the best top-1 agreement of the grids tried:
# none 94.3%, 0.95..0.8 95.9%, these 97.2%, 1/100 steps to 0.7 96.5% (KL 0.0195, 0.0163,
# 0.0152, 0.0140 nats).
CLIP_SHRINKS = tuple(1 - i / 40 for i in range(1, 13))  # 0.975 .. 0.7

ParamPath = tuple[str, ...]
Layout = Mapping[ParamPath, tuple[int, int]]  # path -> (stacked dims, contraction dims)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A parsed `--quant` mode."""

    kind: QuantKind
    group: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.group is None else f"{self.kind}-g{self.group}"


def parse_quant(mode: str | None) -> QuantSpec | None:
    """"int8" / "int8-g128" / "fp8" -> QuantSpec; "none" or None -> None."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANT_MODES:
        raise ConfigError(f"quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    kind, _, group = mode.partition("-g")
    return QuantSpec(kind=kind, group=int(group) if group else None)  # type: ignore[arg-type]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantArray:
    """A quantized weight: value ~= q * scale (module docstring for shapes and layout)."""

    q: Any  # int8 / float8_e4m3fn [*B, *C, *O], or [*B, *O, *C] when transposed; int4: uint8
    # [*B, *O, *C'] (two per byte along K, C' = C with its last dim halved)
    scale: Any  # float32 [*B, *O], or [*B, G, *O] group-wise (G = K/group; int4: ceil)
    kind: QuantKind = dataclasses.field(default="int8", metadata=dict(static=True))
    group: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    out_dims: int = dataclasses.field(default=1, metadata=dict(static=True))  # len(O)
    transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))
    zero: Any = None  # int4 only: int8 zero points in 0..15 (GPTQ's: 1..16), the scale's shape
    # int4 from a GPTQ act-order checkpoint only: int32 [*B, K], the group of each row of K
    # (groups are then not contiguous runs; None: row k is in group k // group).
    g_idx: Any = None

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes
                   + sum(0 if a is None else a.nbytes for a in (self.zero, self.g_idx)))


# -- quantizers ---------------------------------------------------------------------------------

def _split_shape(shape: tuple[int, ...], batch: int, contract: int):
    if contract < 1 or batch < 0 or batch + contract >= len(shape):
        raise ValueError(f"weight of shape {shape} cannot have {batch} stacked and {contract} "
                         "contraction dims plus at least one output dim")
    return shape[:batch], shape[batch:batch + contract], shape[batch + contract:]


def _quantize(w: jax.Array, kind: QuantKind, *, contract: int, batch: int, group: int | None,
              transposed: bool | None) -> QuantArray:
    bshape, cshape, oshape = _split_shape(tuple(w.shape), batch, contract)
    k, n = math.prod(cshape), math.prod(oshape)
    qmax = INT8_MAX if kind == "int8" else FP8_MAX
    w3 = w.astype(jnp.float32).reshape(math.prod(bshape), k, n)
    if group is None:
        amax = jnp.max(jnp.abs(w3), axis=1, keepdims=True)  # [B, 1, N]
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
        scaled = w3 / scale
        scale_shape = bshape + oshape
    else:
        if group <= 0 or k % group:
            raise ConfigError(f"quantization group {group} must divide the contraction size {k}")
        wg = w3.reshape(w3.shape[0], k // group, group, n)
        amax = jnp.max(jnp.abs(wg), axis=2, keepdims=True)  # [B, K/g, 1, N]
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
        scaled = (wg / scale).reshape(w3.shape)
        scale_shape = bshape + (k // group,) + oshape
    if kind == "int8":
        q = jnp.clip(jnp.round(scaled), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    else:
        q = jnp.clip(scaled, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    q = q.reshape(w.shape)
    t = TRANSPOSED[kind] if transposed is None else transposed
    if t:
        nb, nc = len(bshape), len(cshape)
        perm = (*range(nb), *range(nb + nc, w.ndim), *range(nb, nb + nc))
        q = q.transpose(perm)
    return QuantArray(q=q, scale=scale.reshape(scale_shape), kind=kind, group=group,
                      out_dims=len(oshape), transposed=t)


def quantize_int8(w: jax.Array, *, contract: int = 1, batch: int = 0, group: int | None = None,
                  transposed: bool | None = None) -> QuantArray:
    """Symmetric int8: per output column, or per `group` rows of K per column.

    Args:
      w: float weight [*B, *C, *O] (`batch` stacked dims, `contract` contraction dims).
      transposed: store q as [*B, *O, *C]; default `TRANSPOSED["int8"]`.
    """
    return _quantize(w, "int8", contract=contract, batch=batch, group=group,
                     transposed=transposed)


def quantize_fp8(w: jax.Array, *, contract: int = 1, batch: int = 0,
                 transposed: bool | None = None) -> QuantArray:
    """float8_e4m3fn weights with one float32 scale per output column (see `quantize_int8`)."""
    return _quantize(w, "fp8", contract=contract, batch=batch, group=None,
                     transposed=transposed)


@functools.partial(jax.jit, static_argnames=("group",))
def _int4_codes(w3: jax.Array, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 w3 [B, K, N] -> (packed [B, N, K/2] uint8, scale [B, G, N] f32, zero [B, G, N]
    int8), one compiled program (the clipping search is a dozen passes over the weight)."""
    b, k, n = w3.shape
    g = num_groups(k, group)
    pad = g * group - k  # the short last group's missing rows: zeros, which change no min/max
    wg = jnp.pad(w3, ((0, 0), (0, pad), (0, 0))).reshape(b, g, group, n)
    lo = jnp.minimum(wg.min(axis=2), 0.0)  # [B, G, N]
    hi = jnp.maximum(wg.max(axis=2), 0.0)

    def params(shrink):  # scale and zero of the range shrunk by `shrink`, and their error
        scale = jnp.where(hi > lo, (hi - lo) * shrink / INT4_MAX, 1.0)
        zero = jnp.clip(jnp.round(-lo * shrink / scale), 0, INT4_MAX)
        qg = jnp.clip(jnp.round(wg / scale[:, :, None]) + zero[:, :, None], 0, INT4_MAX)
        err = jnp.sum(((qg - zero[:, :, None]) * scale[:, :, None] - wg) ** 2, axis=2)
        return scale, zero, err

    # Clipping search (GPTQ's `mse` option, AutoAWQ's clip search without activations): per
    # group, the shrink of the range with the least squared error; a few outliers then cost
    # less than the coarser steps of the full range.
    scale, zero, best = params(1.0)
    for shrink in CLIP_SHRINKS:
        s_, z_, e_ = params(shrink)
        better = e_ < best
        scale, zero, best = (jnp.where(better, s_, scale), jnp.where(better, z_, zero),
                             jnp.minimum(e_, best))
    def rows(a):  # [B, G, N] -> [B, K, N]
        return jnp.repeat(a, group, axis=1)[:, :k]

    q = jnp.clip(jnp.round(w3 / rows(scale)) + rows(zero), 0, INT4_MAX)
    return pack_int4(jnp.swapaxes(q, 1, 2), group), scale, zero.astype(jnp.int8)


def quantize_int4(w: jax.Array, *, group: int, contract: int = 1, batch: int = 0) -> QuantArray:
    """Asymmetric group-wise int4 (module docstring), packed two per byte along K.

    Args:
      w: float weight [*B, *C, *O] (`batch` stacked dims, `contract` contraction dims); the last
        contraction dim must be even.
      group: rows of K per scale and zero point; a short last group when it does not divide K.
    """
    bshape, cshape, oshape = _split_shape(tuple(w.shape), batch, contract)
    k, n = math.prod(cshape), math.prod(oshape)
    if group <= 0 or group % 2 or cshape[-1] % 2:
        raise ConfigError(f"int4 needs an even group and an even last contraction dim, got "
                          f"group {group} for contraction dims {list(cshape)}")
    packed, scale, zero = _int4_codes(w.astype(jnp.float32).reshape(math.prod(bshape), k, n),
                                      group)
    g = scale.shape[1]
    q_shape = (*bshape, *oshape, *cshape[:-1], cshape[-1] // 2)
    s_shape = (*bshape, g, *oshape)
    return QuantArray(q=packed.reshape(q_shape), scale=scale.reshape(s_shape), kind="int4",
                      group=group, out_dims=len(oshape), transposed=True,
                      zero=zero.reshape(s_shape))


def quantize(w: jax.Array, spec: QuantSpec, *, contract: int = 1, batch: int = 0) -> QuantArray:
    """Quantize `w` as `spec` says (the storage layout from `TRANSPOSED`)."""
    if spec.kind == "int4":
        return quantize_int4(w, group=spec.group, contract=contract, batch=batch)
    if spec.kind == "int8":
        return quantize_int8(w, contract=contract, batch=batch, group=spec.group)
    if spec.group is not None:
        raise ConfigError("fp8 quantization is per channel; it takes no group")
    return quantize_fp8(w, contract=contract, batch=batch)


def _layout_dims(qa: QuantArray) -> tuple[int, int, int]:
    """(stacked, contraction, output) dim counts of a QuantArray, from its scale's rank."""
    nb = qa.scale.ndim - qa.out_dims - (qa.group is not None)
    return nb, qa.q.ndim - nb - qa.out_dims, qa.out_dims


def dequantize(qa: QuantArray, dtype: Any = jnp.float32) -> jax.Array:
    """The float weight [*B, *C, *O] that `qa` stands for, in `dtype`."""
    nb, nc, no = _layout_dims(qa)
    if qa.kind == "int4":  # q [*B, *O, *C'] packed along K
        bshape, oshape = qa.q.shape[:nb], qa.q.shape[nb:nb + no]
        cshape = (*qa.q.shape[nb + no:-1], 2 * qa.q.shape[-1])
        b, n, k = math.prod(bshape), math.prod(oshape), math.prod(cshape)
        w = dequantize_int4(qa.q.reshape(b, n, k // 2), qa.scale.reshape(b, -1, n),
                            qa.zero.reshape(b, -1, n), qa.group,
                            g_idx=None if qa.g_idx is None else qa.g_idx.reshape(b, k))
        return jnp.swapaxes(w, 1, 2).reshape(*bshape, *cshape, *oshape).astype(dtype)
    q = qa.q
    if qa.transposed:  # [*B, *O, *C] -> [*B, *C, *O]
        perm = (*range(nb), *range(nb + no, nb + no + nc), *range(nb, nb + no))
        q = q.transpose(perm)
    bshape, cshape, oshape = q.shape[:nb], q.shape[nb:nb + nc], q.shape[nb + nc:]
    k, n = math.prod(cshape), math.prod(oshape)
    q3 = q.astype(jnp.float32).reshape(math.prod(bshape), k, n)
    if qa.group is None:
        w3 = q3 * qa.scale.reshape(-1, 1, n)
    else:
        g = qa.group
        w3 = (q3.reshape(-1, k // g, g, n) * qa.scale.reshape(-1, k // g, 1, n)).reshape(q3.shape)
    return w3.reshape(q.shape).astype(dtype)


def matmul_operands(qa: QuantArray, contract: int) -> tuple[jax.Array, jax.Array]:
    """Kernel operands: (q [K, N] or [N, K] when transposed, scale [N] or [K/group, N]), with a
    leading [L] when `qa` still holds a stack of layers (one leading stacked dim at most)."""
    stacked = qa.q.ndim - contract - qa.out_dims
    if stacked not in (0, 1):
        raise ValueError(f"QuantArray q {qa.q.shape} with {qa.out_dims} output dims cannot "
                         f"contract {contract} dims")
    lead = qa.q.shape[:stacked]
    dims = qa.q.shape[stacked:]
    if qa.transposed:
        oshape, cshape = dims[:qa.out_dims], dims[qa.out_dims:]
    else:
        cshape, oshape = dims[:contract], dims[contract:]
    k, n = math.prod(cshape), math.prod(oshape)  # int4: k is K / 2, the bytes per column
    q = qa.q.reshape(*lead, *((n, k) if qa.transposed else (k, n)))
    if qa.group is None:
        scale = qa.scale.reshape(*lead, n)
    else:
        scale = qa.scale.reshape(*lead, -1, n)
    return q, scale


def matmul_zero(qa: QuantArray) -> jax.Array:
    """An int4 QuantArray's zero points as the kernel takes them: [G, N] ([L, G, N] stacked),
    beside `matmul_operands`' scale."""
    if qa.zero is None:
        raise ValueError(f"a {qa.kind} QuantArray has no zero points")
    n = math.prod(qa.zero.shape[qa.zero.ndim - qa.out_dims:])
    lead = qa.zero.shape[:qa.zero.ndim - qa.out_dims - 1]
    return qa.zero.reshape(*lead, -1, n)


def output_shape(qa: QuantArray, contract: int) -> tuple[int, ...]:
    """The output dims O of a QuantArray (stacked or not)."""
    dims = qa.q.shape[qa.q.ndim - contract - qa.out_dims:]
    return tuple(dims[:qa.out_dims] if qa.transposed else dims[contract:])


# -- trees --------------------------------------------------------------------------------------

def _get(tree: Mapping, path: ParamPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def replace_paths(tree: Mapping, updates: Mapping[ParamPath, Any]) -> dict:
    """A copy of the nested dict `tree` with the leaves at `updates`' paths replaced."""
    out = dict(tree)
    children: dict[str, dict[ParamPath, Any]] = {}
    for path, value in updates.items():
        if len(path) == 1:
            out[path[0]] = value
        else:
            children.setdefault(path[0], {})[path[1:]] = value
    for key, sub in children.items():
        out[key] = replace_paths(tree[key], sub)
    return out


def quantize_params(params: Mapping, layout: Layout, spec: QuantSpec) -> dict:
    """Replace each weight in `layout` (path -> (stacked, contraction dims)) by its QuantArray."""
    return replace_paths(params, {path: quantize(_get(params, path), spec, batch=b, contract=c)
                             for path, (b, c) in layout.items()})


def quantized_axes(axes: tuple, spec: QuantSpec, *, batch: int, contract: int,
                   g_idx: bool = False) -> QuantArray:
    """Logical axes of the QuantArray of a weight whose axes are `axes` (a QuantArray whose q
    and scale are axis-name tuples; `sharding.tree_shardings` maps it like any tree).

    With `g_idx` (a GPTQ act-order weight) the groups are scattered over K, so the group axis
    of scale and zero is replicated, and g_idx [*B, K] is split like K's first axis: a shard
    of a row-parallel weight looks up its own rows' groups in the whole scales, locally."""
    bax, cax, oax = _split_shape(tuple(axes), batch, contract)
    t = TRANSPOSED[spec.kind]
    q_axes = (*bax, *oax, *cax) if t else tuple(axes)
    s_axes = (*bax, *oax) if spec.group is None else (*bax, None if g_idx else cax[0], *oax)
    return QuantArray(q=q_axes, scale=s_axes, kind=spec.kind, group=spec.group,
                      out_dims=len(oax), transposed=t,
                      zero=s_axes if spec.kind == "int4" else None,
                      g_idx=(*bax, cax[0]) if g_idx else None)


def quantize_axes_tree(axes_tree: Mapping, layout: Layout, spec: QuantSpec,
                       g_idx_paths: frozenset = frozenset()) -> dict:
    return replace_paths(axes_tree, {path: quantized_axes(_get(axes_tree, path), spec, batch=b,
                                                     contract=c, g_idx=path in g_idx_paths)
                                for path, (b, c) in layout.items()})


def quantized_structs(shapes: Mapping[ParamPath, tuple[int, ...]], layout: Layout,
                      spec: QuantSpec, g_idx_paths: frozenset = frozenset()
                      ) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the stored (split) form: a quantized weight at path p
    becomes p + ("q",) and p + ("scale",) (int4: also "zero", and "g_idx" [*B, K] int32 for
    the paths in `g_idx_paths`); other paths are left out."""
    out: dict[ParamPath, jax.ShapeDtypeStruct] = {}
    for path, (b, c) in layout.items():
        qa = jax.eval_shape(lambda w, b=b, c=c: quantize(w, spec, batch=b, contract=c),
                            jax.ShapeDtypeStruct(shapes[path], jnp.float32))
        out[(*path, "q")] = qa.q
        out[(*path, "scale")] = qa.scale
        if qa.zero is not None:
            out[(*path, "zero")] = qa.zero
        if path in g_idx_paths:
            shape = shapes[path]
            out[(*path, "g_idx")] = jax.ShapeDtypeStruct(
                (*shape[:b], math.prod(shape[b:b + c])), jnp.int32)
    return out


def split_quant(tree: Any) -> Any:
    """Every QuantArray in a nested dict -> {"q": q, "scale": scale[, "zero": zero]} (the
    on-disk form)."""
    if isinstance(tree, QuantArray):
        parts = {"q": tree.q, "scale": tree.scale, "zero": tree.zero, "g_idx": tree.g_idx}
        return {k: v for k, v in parts.items() if v is not None}
    if isinstance(tree, Mapping):
        return {k: split_quant(v) for k, v in tree.items()}
    return tree


def join_quant(tree: Mapping, layout: Layout, spec: QuantSpec) -> dict:
    """Inverse of `split_quant` for the weights in `layout`, quantized as `spec`."""
    updates = {}
    for path, (b, c) in layout.items():
        node = _get(tree, path)
        parts = {"q", "scale", "zero"} if spec.kind == "int4" else {"q", "scale"}
        if isinstance(node, Mapping) and spec.kind == "int4" and "g_idx" in node:
            parts = parts | {"g_idx"}
        if not isinstance(node, Mapping) or set(node) != parts:
            raise ValueError(f"{'/'.join(path)}: expected a quantized {{{', '.join(sorted(parts))}}} "
                             "entry")
        ndim = len(node["q"].shape)
        updates[path] = QuantArray(q=node["q"], scale=node["scale"], kind=spec.kind,
                                   group=spec.group, out_dims=ndim - b - c,
                                   transposed=TRANSPOSED[spec.kind], zero=node.get("zero"),
                                   g_idx=node.get("g_idx"))
    return replace_paths(tree, updates)
