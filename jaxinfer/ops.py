"""Kernel dispatch: the one place that chooses a Pallas kernel or its plain-JAX reference.

Models call these functions and never import `pallas_kernels` directly, so every model runs on
CPU with the references and on GPU with the kernels, chosen by `EngineConfig.kernels`. With
`kernels="pallas"` on a CPU backend the kernels run in Pallas interpret mode (slow, exact), which
is how CI checks them.

Weight matmuls (`linear`): a plain array runs as an XLA dot, exactly the einsum it replaces; a
float weight stack at decode with kernels="pallas" runs `dense_matmul`, reading layer `layer`
in place (`reads_layers_in_place`), per tp shard under tensor parallelism; a `QuantArray` runs
the quantized kernel (`pallas_kernels.qmatmul`; int4: `pallas_kernels.int4_matmul`) or its
reference. With kernels="pallas" the
quantized kernel takes the weight-streaming regime, M (tokens in the matmul) up to
`QMATMUL_KERNEL_MAX_M`; larger M goes to the XLA form, which measured faster there on an H100
(fp8, M = 4096, K = N = 8192: XLA's fp8 dot runs cuBLASLt at 1290 TFLOP/s, our Triton tile at
500; int8, K = 4096, N = 14336: XLA convert+dot 45 us at M = 128 and 72 us at M = 256, our
kernel 56 and 80 us). The quantized kernel is used only where no mesh axis is partitioned
automatically (one device, or only the runner's manual dp/pp axes): a pallas_call is not
partitioned by GSPMD, and the quantized matmuls are not yet wrapped in `spmd.over_tp` as the
float ones and the attention kernels are, so under tensor parallelism they take the XLA form.

Tensor-parallel reductions issued here (row-parallel partial sums, the vocab-parallel
`embedding`) are summed in `tp_reduce_dtype`.

Attention routing: a step with at most `DECODE_MAX_T` new tokens per sequence (decode and
speculative verification) goes to the paged decode kernel (flash-decoding, split over the
sequence); longer steps (prefill chunks) go to the flash prefill kernel. Both read the same paged
cache, so chunked prefill and prefix-cache hits need nothing special.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxinfer.config import KERNELS, Kernels
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import CACHE_AXES, SCALE_AXES
from jaxinfer.quant import QuantArray, matmul_operands, matmul_zero, output_shape
from pallas_kernels import int4_matmul as _int4
from pallas_kernels import paged_attention as _paged
from pallas_kernels import qmatmul as _qmm
from sharding import spmd
from sharding.rules import DEFAULT_RULES

DECODE_MAX_T = 8  # query tokens per sequence up to which the decode kernel is used
# Largest M (batch x tokens) of a quantized matmul that runs the Pallas kernel (see above).
# int8 on an H100 (K=4096, N=14336): ours 23 us at M = 1..16 and 46 us at M = 64, XLA's
# convert+dot 50 / 30 / 38 us at M = 1 / 16 / 64: the crossover is near 32. fp8 decode was not
# measured separately; it shares the int8 kernel's streaming structure and bound.
# int4-g128 on an H200 (benchmarks/results/qmatmul_decode_shapes_h200_fc6b940.jsonl): ours beats
# XLA's dequant+dot from M = 2 to 256 at that shape, yet a bound of 256 made the 1B shape's
# batch-64 decode 0.90x as fast end to end (e2e_int4_kernel_bound_trial_h200.jsonl): 32 stays.
QMATMUL_KERNEL_MAX_M = {"int8": 32, "fp8": 32, "int4": 32}
# Largest M up to which a float weight stack is read in place by `dense_matmul` (one row tile
# of the streaming kernel). Beyond it (prefill chunks) the layer's slice is copied out and XLA's
# dot runs; the copy is then small beside the matmul.
DENSE_KERNEL_MAX_M = 64


def tp_reduce_dtype(dtype, override: str | None = None) -> jnp.dtype:
    """The dtype in which partial results of `dtype` are summed over tp: `override`
    (`EngineConfig.tp_reduce_dtype`) when given, else the activations' dtype on GPU, as
    Megatron and vLLM reduce (2x H200, 8B shape, tp=2, batch 32: 5.33 ms per decode step in
    bfloat16 against 5.66 in float32; batch 1 the same), and float32 elsewhere (a bfloat16
    psum inside a shard_map aborts XLA's CPU compiler)."""
    if override is not None:
        return jnp.dtype(override)
    return jnp.dtype(jnp.float32 if use_interpret() else dtype)


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
    """Causal attention of T new queries per sequence over its paged cache -> [B, T, N, H].

    Under tensor parallelism the kernels run per tp shard (`sharding.spmd.over_tp`): each
    device attends with its own query heads over its own KV heads, which is exactly how the
    cache and q are split, so nothing moves. A pallas_call left to GSPMD would instead gather
    the whole cache onto every device. Where the KV heads are replicated (fewer than tp) or
    another automatic axis is split, the reference runs."""
    check_kernels(kernels)
    kw = dict(scale=scale, sliding_window=sliding_window)
    args = (q, k_pages, v_pages, layer, block_tables, seq_lens, positions)
    tp = spmd.auto_tp()
    if kernels == "reference" or tp is None or k_pages.shape[1] % tp:
        return _paged.paged_attention_reference(*args, k_scale=k_scale, v_scale=v_scale, **kw)
    if q.shape[1] <= DECODE_MAX_T:
        from pallas_kernels import paged_decode_attention as _module
        kernel = _module.paged_decode_attention
    else:
        from pallas_kernels import flash_attention as _module
        kernel = _module.flash_prefill_attention

    def attend(q, k_pages, v_pages, layer, block_tables, seq_lens, positions, k_scale, v_scale):
        return kernel(q, k_pages, v_pages, layer, block_tables, seq_lens, positions,
                      k_scale=k_scale, v_scale=v_scale, **kw, interpret=use_interpret())

    if tp == 1:
        return attend(*args, k_scale, v_scale)
    heads = ("batch", "seq", "heads", "head_dim")
    pages = CACHE_AXES
    scales = SCALE_AXES if k_scale is not None else None
    return spmd.over_tp(
        attend, (heads, pages, pages, (), ("batch", None), ("batch",), ("batch", "seq"),
                 scales, scales), heads)(*args, k_scale, v_scale)


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


def embedding(table: jax.Array, tokens: jax.Array, *, reduce_dtype: str | None = None
              ) -> jax.Array:
    """Rows `tokens` [...] of the embedding `table` [V, D] -> [..., D].

    Under tensor parallelism the table is split over the vocabulary, and GSPMD partitions a
    gather from it as it sees fit: for a single decode row on an H200 pair it all-gathered the
    whole 1 GB table of the 8B shape every token (1.9 ms, `benchmarks/decode_trace_probe.py`).
    Here each tp shard instead looks up the tokens in its own vocabulary range, zeroes the rest
    and one all-reduce of [..., D] sums the shards (Megatron's vocab-parallel embedding). The
    sum has one non-zero term per element, so it is exact; it is taken in `tp_reduce_dtype`
    like the row-parallel matmuls' (`_stacked_linear`)."""
    tp = spmd.auto_tp()
    if tp is None or tp == 1 or table.shape[0] % tp:
        return jnp.take(table, tokens, axis=0)

    def shard(table, tokens):
        rows = table.shape[0]
        local = tokens - jax.lax.axis_index("tp") * rows
        mine = (local >= 0) & (local < rows)
        out = jnp.take(table, jnp.where(mine, local, 0), axis=0)
        out = jnp.where(mine[..., None], out, jnp.zeros((), out.dtype))
        summed = jax.lax.psum(out.astype(tp_reduce_dtype(table.dtype, reduce_dtype)), "tp")
        return summed.astype(table.dtype)

    free = (None,) * tokens.ndim
    with jax.named_scope("vocab_parallel_embedding"):  # named in the HLO (tests find it)
        return spmd.over_tp(shard, (("vocab", None), free), free + (None,))(table, tokens)


def _mesh_is_sharded() -> bool:
    """True when GSPMD partitions the arrays here: an axis of size > 1 that is not manual (inside
    the runner's shard_map over dp/pp the arrays are already the local blocks)."""
    return spmd.auto_tp() != 1


def linear(
    x: jax.Array,  # [..., *C] activations
    w: jax.Array | QuantArray,  # [*C, *O] float weight, or a QuantArray ([L, ...] stacked)
    *,
    contract: int = 1,  # how many trailing dims of x (leading dims of w) are contracted
    kernels: Kernels,
    layer: jax.Array | int | None = None,  # which layer of a stacked QuantArray
    out_dtype=None,
    axes: tuple[str | None, ...] | None = None,  # logical axes of one layer's float weight
    reduce_dtype: str | None = None,  # tp all-reduce dtype override (`tp_reduce_dtype`)
) -> jax.Array:
    """x @ w over the last `contract` dims of x -> [..., *O] in `out_dtype` (default x's dtype;
    a float weight keeps XLA's usual result type). A QuantArray runs the int8, fp8 or int4 kernel
    (kernels="pallas") or the plain-JAX reference, on x flattened to [M, K]; a stacked one
    (a leading layers axis) is read in place at `layer`, never sliced out of the stack. A float
    weight stack [L, *C, *O] (one more dim than its per-layer `axes`) is read at `layer` the
    same way where `reads_layers_in_place` says so, else sliced for XLA's dot."""
    check_kernels(kernels)
    if not isinstance(w, QuantArray):
        if axes is not None and w.ndim == len(axes) + 1:
            return _stacked_linear(x, w, layer, axes=axes, contract=contract, kernels=kernels,
                                   out_dtype=out_dtype, reduce_dtype=reduce_dtype)
        return jnp.tensordot(x, w, axes=contract, preferred_element_type=out_dtype)
    lead = x.shape[:x.ndim - contract]
    q, scale = matmul_operands(w, contract)
    stacked = q.ndim == 3
    if stacked and layer is None:
        raise ValueError(f"stacked QuantArray {w.q.shape} needs a layer index")
    k = q.shape[-1] if w.transposed else q.shape[-2]
    k = 2 * k if w.kind == "int4" else k  # int4: two values per byte along K
    x2 = x.reshape(math.prod(lead), k)
    out_dtype = out_dtype or x.dtype
    use_kernel = (kernels == "pallas" and x2.shape[0] <= QMATMUL_KERNEL_MAX_M[w.kind]
                  and not _mesh_is_sharded())
    kw = dict(layer=layer if stacked else None, transposed=w.transposed, out_dtype=out_dtype)
    if w.kind == "int4":
        kw4 = dict(group=w.group, layer=kw["layer"], out_dtype=out_dtype)
        zero = matmul_zero(w)
        if w.g_idx is not None:  # act-order groups: only the reference gathers per row
            out = _int4.int4_matmul_reference(x2, q, scale, zero, g_idx=w.g_idx, **kw4)
        elif use_kernel:
            out = _int4.int4_matmul(x2, q, scale, zero, **kw4, interpret=use_interpret())
        else:
            out = _int4.int4_matmul_reference(x2, q, scale, zero, **kw4)
    elif w.kind == "int8":
        if use_kernel:
            out = _qmm.int8_matmul(x2, q, scale, group=w.group, **kw, interpret=use_interpret())
        else:
            out = _qmm.int8_matmul_reference(x2, q, scale, group=w.group, **kw)
    elif use_kernel:
        out = _qmm.fp8_matmul(x2, q, scale, **kw, interpret=use_interpret())
    else:
        out = _qmm.fp8_matmul_reference(x2, q, scale, **kw)
    return out.reshape(*lead, *output_shape(w, contract))


def reads_layers_in_place(kernels: Kernels, tokens: int) -> bool:
    """Whether a step of `tokens` rows (batch x new tokens) reads float layer weights in place
    from their stacks (`dense_matmul`), so the model should keep them out of its layer scan.
    XLA's dot needs the layer's slice copied out of the stack first: at decode that copy costs
    more than the matmul (H100, Llama-3.1-8B-shaped projections at batch 1: 15.1 ms per token
    scanned, 9.4 ms of it copies; 5.6 ms with no slicing)."""
    return kernels == "pallas" and tokens <= DENSE_KERNEL_MAX_M and spmd.auto_tp() is not None


def _stacked_linear(x, w, layer, *, axes, contract: int, kernels: Kernels, out_dtype,
                    reduce_dtype: str | None):
    """x @ w[layer] for a float weight stack w [L, *C, *O] whose layer has logical `axes`."""
    lead = x.shape[:x.ndim - contract]
    tp = spmd.auto_tp()
    on_tp = [name is not None and DEFAULT_RULES.get(name) == "tp" for name in axes]
    split = [n for n, t in zip(w.shape[1:], on_tp) if t]
    if (not reads_layers_in_place(kernels, math.prod(lead)) or x.dtype != w.dtype
            or (tp and tp > 1 and any(n % tp for n in split))):
        return jnp.tensordot(x, w[layer], axes=contract, preferred_element_type=out_dtype)

    def run(x, w, layer, dtype=out_dtype):  # on local blocks
        k = math.prod(w.shape[1:1 + contract])
        n = math.prod(w.shape[1 + contract:])
        out = _qmm.dense_matmul(x.reshape(-1, k), w.reshape(w.shape[0], k, n), layer=layer,
                                out_dtype=dtype, interpret=use_interpret())
        return out.reshape(*x.shape[:x.ndim - contract], *w.shape[1 + contract:])

    if tp == 1:
        return run(x, w, layer)
    # Megatron under tp: a column-parallel weight (output axes on tp) needs nothing more; a
    # row-parallel one (contracted axes on tp) leaves partial sums, reduced here in
    # `tp_reduce_dtype` (float32 on CPU, the activations' dtype on GPU).
    row_parallel = any(on_tp[:contract])

    def shard(x, w, layer):
        if not row_parallel:
            return run(x, w, layer)
        partial = run(x, w, layer, tp_reduce_dtype(out_dtype or x.dtype, reduce_dtype))
        return jax.lax.psum(partial, "tp").astype(out_dtype or x.dtype)

    free = (None,) * len(lead)
    return spmd.over_tp(shard, (free + axes[:contract], ("layers",) + axes, ()),
                        free + axes[contract:])(x, w, layer)
