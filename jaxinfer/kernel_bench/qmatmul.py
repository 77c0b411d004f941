"""Quantized matmul rows for `python -m jaxinfer.bench kernels --ops qmatmul`.

int8 weight-only (DESIGN.md section 4: K=4096, N=14336, M = 1..256): our kernel per channel and
with groups of 128, beside XLA's bf16 dot (the bar: at most 22 us for M <= 16, never slower
than bf16 up to M = 256), XLA on int8 weights (convert, dot, scale: `int8_matmul_reference`
jitted) and JAX's own Hopper mixed-type kernel (`hopper_mixed_type_matmul_mgpu`, Mosaic GPU).
That kernel multiplies an int8 left operand by a bf16 right one, so it computes
out^T = w^T [N, K] @ x^T [K, M], with M padded to its smallest useful tile (64); the padding is
outside the timed call. Rows report time_us, gbps (weight bytes read once / time) and, from
M = 128, tflops. int4-g128 on the same shapes: ours (`pallas_kernels.int4_matmul`, untuned)
and XLA on the packed weight (unpack, dequantize, dot: `int4_matmul_reference` jitted, what
`ops.linear` runs above `QMATMUL_KERNEL_MAX_M`).

fp8 W8A8 (large M, K = N = 8192): ours with the per-token activation quantization included
and the GEMM alone on pre-quantized activations, beside XLA's bf16 dot, XLA's own fp8 dot
(`fp8_gemm_reference`: cuBLASLt on Hopper) and XLA's fp8 dot with the activation quantization
included (`xla_fp8_w8a8`: what `ops.linear` runs for M above `QMATMUL_KERNEL_MAX_M`). Rows
report time_us and tflops (2*M*N*K / time).

Weights use the layout the model stores (`jaxinfer.quant.TRANSPOSED`). An anchor that fails
(API drift, no GPU) becomes a row with an `error` field; ours is checked against its reference
(`max_abs_err_vs_ref`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxinfer import quant
from jaxinfer.kernel_bench import base_row, on_gpu, time_kernel
from pallas_kernels import int4_matmul as k4
from pallas_kernels import qmatmul as qm

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "int8" (weight-only) or "fp8" (W8A8)
    m: int
    k: int
    n: int
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        return f"M={self.m},K={self.k},N={self.n},{self.kind}"

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


def case_list(quick: bool) -> list[Case]:
    if quick:
        return ([Case("int8", m, 256, 512) for m in (1, 16, 128)]
                + [Case("fp8", 128, 256, 256)])
    return ([Case("int8", m, 4096, 14336) for m in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
            + [Case("fp8", m, 8192, 8192) for m in (1024, 4096, 8192)])


def make_inputs(c: Case, seed: int) -> dict:
    """x [M, K], the bf16 weight [K, N] and its int8 (per-channel, g128) and fp8 forms."""
    kx, kw = jax.random.split(jax.random.key(seed))
    dt = jnp.dtype(c.dtype)
    x = jax.random.normal(kx, (c.m, c.k), dt)
    w = (jax.random.normal(kw, (c.k, c.n), jnp.float32) * 0.02).astype(dt)
    out = dict(x=x, w=w)
    if c.kind == "int8":
        out["int8"] = quant.quantize_int8(w, contract=1)
        out["g128"] = quant.quantize_int8(w, contract=1, group=128)
        out["w_t"] = quant.quantize_int8(w, contract=1, transposed=True).q  # [N, K] for mgpu
        out["int4"] = quant.quantize_int4(w, group=128)
    else:
        out["fp8"] = quant.quantize_fp8(w, contract=1)
        out["x_q"], out["x_scale"] = qm.quantize_rows_fp8(x)
    return out


def _weight_args(qa: quant.QuantArray) -> tuple:
    return quant.matmul_operands(qa, contract=1)


def _impls(c: Case) -> list[tuple[str, Callable, Callable, dict]]:
    """(impl, fn, inputs -> args, extra row fields) for each implementation of the case."""
    interpret = not on_gpu()
    out: list[tuple[str, Callable, Callable, dict]] = []
    xla_bf16 = ("xla_bf16", lambda x, w: jnp.dot(x, w), lambda d: (d["x"], d["w"]),
                dict(weight_bytes=c.k * c.n * jnp.dtype(c.dtype).itemsize))
    if c.kind == "int8":
        cfg = qm.INT8_DEFAULT
        t = quant.TRANSPOSED["int8"]
        for impl, key, group in (("ours_int8", "int8", None), ("ours_int8_g128", "g128", 128)):
            blocks = cfg.blocks(c.m)
            fields = dict(group=group, transposed=t, weight_bytes=_nbytes(c, group),
                          **dataclasses.asdict(blocks))

            def ours(x, w_q, s, group=group):
                return qm.int8_matmul(x, w_q, s, group=group, transposed=t, interpret=interpret)

            out.append((impl, ours, lambda d, key=key: (d["x"], *_weight_args(d[key])), fields))
        out.append(xla_bf16)

        def dequant(x, w_q, s):
            return qm.int8_matmul_reference(x, w_q, s, transposed=t)

        out.append(("xla_int8_dequant", dequant, lambda d: (d["x"], *_weight_args(d["int8"])),
                    dict(weight_bytes=_nbytes(c, None))))

        def ours_int4(x, w_q, s, z):
            return k4.int4_matmul(x, w_q, s, z, group=128, interpret=interpret)

        def xla_int4(x, w_q, s, z):
            return k4.int4_matmul_reference(x, w_q, s, z, group=128)

        int4_fields = dict(group=128, weight_bytes=_int4_nbytes(c),
                           **dataclasses.asdict(k4.DEFAULT))
        for impl, fn in (("ours_int4_g128", ours_int4), ("xla_int4_dequant", xla_int4)):
            out.append((impl, fn, lambda d: (d["x"], *_int4_args(d["int4"])), int4_fields))
        mp = max(64, pl.next_power_of_2(c.m))
        tile_n = min(mp, 128)

        def mixed(w_t, x_t):
            from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mx
            conf = mx.TuningConfig(tile_m=128, tile_n=tile_n, tile_k=128,
                                   max_concurrent_steps=4, epi_tile_n=min(64, tile_n),
                                   epi_tile_m=64)
            # int8 [N, K] @ bf16 [K, Mp]: the weight is the int8 (left) operand.
            return mx.mixed_matmul_kernel(w_t, x_t, out_dtype=jnp.bfloat16, config=conf)

        def mixed_args(d):
            x_t = jnp.zeros((c.k, mp), d["x"].dtype).at[:, : c.m].set(d["x"].T)
            return d["w_t"], x_t

        out.append(("jax_pallas_mixed_mgpu", mixed, mixed_args,
                    dict(tile_m=128, tile_n=tile_n, tile_k=128, m_padded=mp,
                         weight_bytes=c.k * c.n, note="no scales (unscaled int8 x bf16)")))
        return out
    cfg = qm.FP8_DEFAULT
    t = quant.TRANSPOSED["fp8"]
    blocks = dataclasses.asdict(cfg.blocks(c.m))

    def ours_fp8(x, w_q, s):
        return qm.fp8_matmul(x, w_q, s, transposed=t, interpret=interpret)

    def ours_gemm(x_q, x_s, w_q, s):
        return qm.fp8_gemm(x_q, x_s, w_q, s, transposed=t, interpret=interpret)

    def xla_fp8(x_q, x_s, w_q, s):
        return qm.fp8_gemm_reference(x_q, x_s, w_q, s, transposed=t)

    out.append(("ours_fp8", ours_fp8, lambda d: (d["x"], *_weight_args(d["fp8"])),
                dict(transposed=t, activation_quant="included", **blocks)))
    out.append(("ours_fp8_gemm", ours_gemm,
                lambda d: (d["x_q"], d["x_scale"], *_weight_args(d["fp8"])),
                dict(transposed=t, activation_quant="excluded", **blocks)))
    out.append(xla_bf16)
    out.append(("xla_fp8", xla_fp8, lambda d: (d["x_q"], d["x_scale"], *_weight_args(d["fp8"])),
                dict(transposed=t, activation_quant="excluded")))

    def xla_w8a8(x, w_q, s):  # what ops.linear runs above QMATMUL_KERNEL_MAX_M
        return qm.fp8_matmul_reference(x, w_q, s, transposed=t)

    out.append(("xla_fp8_w8a8", xla_w8a8, lambda d: (d["x"], *_weight_args(d["fp8"])),
                dict(transposed=t, activation_quant="included")))
    return out


def _int4_args(qa: quant.QuantArray) -> tuple:
    return (*quant.matmul_operands(qa, contract=1), quant.matmul_zero(qa))


def _int4_nbytes(c: Case) -> int:
    """Packed weight (K/2 bytes per column) plus float32 scales and int8 zeros per group."""
    return c.k * c.n // 2 + k4.num_groups(c.k, 128) * c.n * 5


def _nbytes(c: Case, group: int | None) -> int:
    scales = c.n * 4 if group is None else (c.k // group) * c.n * 4
    return c.k * c.n + scales


def _error_row(c: Case, impl: str, e: Exception, **extra) -> dict:
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return base_row(op="qmatmul", impl=impl, shape=c.label, metric="error", value=None,
                    unit="", error=msg, **extra)


def _reference(c: Case, impl: str, d: dict) -> np.ndarray | None:
    """The reference output ours is compared with (float32 numpy)."""
    if impl == "ours_int8":
        args = _weight_args(d["int8"])
        return np.asarray(qm.int8_matmul_reference(d["x"], *args,
                                                   transposed=quant.TRANSPOSED["int8"]),
                          np.float32)
    if impl == "ours_int8_g128":
        args = _weight_args(d["g128"])
        return np.asarray(qm.int8_matmul_reference(d["x"], *args, group=128,
                                                   transposed=quant.TRANSPOSED["int8"]),
                          np.float32)
    if impl == "ours_int4_g128":
        return np.asarray(k4.int4_matmul_reference(d["x"], *_int4_args(d["int4"]), group=128),
                          np.float32)
    if impl in ("ours_fp8", "ours_fp8_gemm"):
        args = _weight_args(d["fp8"])
        return np.asarray(qm.fp8_matmul_reference(d["x"], *args,
                                                  transposed=quant.TRANSPOSED["fp8"]),
                          np.float32)
    return None


def run_case(c: Case, *, iterations: int, num_sets: int = 2) -> Iterator[dict]:
    """Time every implementation on one shape; yields time_us plus rate rows per impl."""
    sets = [make_inputs(c, seed) for seed in range(num_sets)]
    for impl, fn, to_args, extra in _impls(c):
        if impl.startswith("jax_pallas") and not on_gpu():
            yield _error_row(c, impl, RuntimeError("needs an NVIDIA Hopper GPU"), **extra)
            continue
        try:
            arg_sets = [to_args(d) for d in sets]
            seconds = time_kernel(fn, arg_sets, iterations=iterations)
            fields = dict(extra)
            ref = _reference(c, impl, sets[0])
            if ref is not None:
                got = np.asarray(jax.jit(fn)(*arg_sets[0]), np.float32)
                fields["max_abs_err_vs_ref"] = float(np.max(np.abs(got - ref)))
        except Exception as e:  # an anchor's API or hardware need must not stop the bench
            yield _error_row(c, impl, e, **extra)
            continue
        common = dict(op="qmatmul", impl=impl, shape=c.label, m=c.m, k=c.k, n=c.n,
                      kind=c.kind, dtype=c.dtype, **fields)
        yield base_row(metric="time_us", value=seconds * 1e6, unit="us", **common)
        if "weight_bytes" in fields:
            yield base_row(metric="gbps", value=fields["weight_bytes"] / seconds / 1e9,
                           unit="GB/s", **common)
        if c.kind == "fp8" or c.m >= 128:
            yield base_row(metric="tflops", value=c.flops / seconds / 1e12, unit="TFLOP/s",
                           **common)


def cases(args) -> Iterator[dict]:
    """Rows for every shape (`args.quick`: tiny shapes for a CPU smoke run)."""
    iterations = 3 if args.quick else args.iterations
    for c in case_list(args.quick):
        yield from run_case(c, iterations=iterations)
