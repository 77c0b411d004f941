"""The quantized matmul kernels (int8 weight-only, fp8 W8A8) against their references.

Inputs are fresh random draws per case: x ~ N(0, 1), weights quantized from N(0, 0.02) by
`jaxinfer.quant`, so scales are realistic. Shapes cover the decode regime (M = 1, 3, 16, one row
tile padded to 16 by masked loads), the tiled regime (M = 64, 200 with several row tiles in
grouped order), ragged M/N/K (tails masked), both weight layouts, groups of 64 and 128, split-K,
and float32 outputs (the logits path). Poison: in interpret mode Pallas pads every block that
overhangs an array with NaN (int8: -128) and starts outputs as NaN, so a missing mask or an
unwritten element shows up as a NaN or a wrong value; every output element is compared.

`TestQMatmul` compiles for the GPU (marked `gpu`; fp8 needs sm89); the interpret subclass runs
the same cases on CPU. `test_lowers_for_cuda` runs the Triton lowering at serving shapes.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import quant
from pallas_kernels import qmatmul as qm

# Tolerance relative to the output's RMS. Both sides accumulate in float32 from exact products
# (int8 -> bf16/f32 is exact; e4m3 x e4m3 is exact in f32) and differ only in summation order;
# bf16/f16 outputs add one final rounding each (2^-8 relative), which may differ by one ulp.
TOL = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 2e-3}
# Hopper's fp8 tensor-core MMA accumulates with fewer bits than float32 (DeepSeek-V3's report
# measures ~14), in our Triton tile and in cuBLASLt's reference dot alike: on the H100 a float32
# fp8 case differed by 2e-4 of the output RMS. Compiled fp8 cases get this floor.
FP8_MMA_TOL = 1e-3
# Small tiles so the interpret cases still span several programs along M, N and K.
SMALL = qm.QMatmulTuning(
    small=qm.MatmulBlocks(block_m=16, block_n=32, block_k=64, split_k=2, num_stages=2),
    large=qm.MatmulBlocks(block_m=32, block_n=32, block_k=32, group_m=2, num_stages=2),
    small_m_max=16)
SWAP = qm.QMatmulTuning(
    small=qm.MatmulBlocks(block_m=16, block_n=32, block_k=64, split_k=2, swap_ab=True),
    large=qm.MatmulBlocks(block_m=32, block_n=64, block_k=32, group_m=2, swap_ab=True),
    small_m_max=16)


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "int8" | "fp8"
    m: int
    k: int = 256
    n: int = 192
    group: int | None = None
    transposed: bool = False
    x_dtype: str = "bfloat16"
    out_dtype: str | None = None
    cfg: qm.QMatmulTuning | None = None  # None: the kernel's defaults


CASES = {
    "int8_m1": Case("int8", 1),
    "int8_m3_transposed": Case("int8", 3, transposed=True),
    "int8_m16_f32": Case("int8", 16, x_dtype="float32"),
    "int8_m64_g64": Case("int8", 64, group=64),
    "int8_m200_g128_transposed": Case("int8", 200, k=512, group=128, transposed=True),
    "int8_m3_split_k_small_tiles": Case("int8", 3, k=512, cfg=SMALL),
    "int8_m200_small_tiles": Case("int8", 200, cfg=SMALL),
    "int8_m64_g64_small_tiles_transposed": Case("int8", 64, group=64, transposed=True, cfg=SMALL),
    "int8_ragged_k172_n100": Case("int8", 5, k=172, n=100, cfg=SMALL),
    "int8_ragged_m200_k172_n100_t": Case("int8", 200, k=172, n=100, transposed=True),
    "int8_f16": Case("int8", 16, x_dtype="float16"),
    "int8_out_f32": Case("int8", 3, out_dtype="float32"),
    "int8_swap_ab_m3_g64_t": Case("int8", 3, group=64, transposed=True, cfg=SWAP),
    "int8_swap_ab_m200_ragged": Case("int8", 200, k=172, n=100, cfg=SWAP),
    "fp8_m1": Case("fp8", 1),
    "fp8_m16_transposed": Case("fp8", 16, transposed=True),
    "fp8_m64": Case("fp8", 64, transposed=True, x_dtype="float32"),
    "fp8_m200_small_tiles": Case("fp8", 200, transposed=True, cfg=SMALL),
    "fp8_m3_split_k_small_tiles": Case("fp8", 3, k=512, cfg=SMALL),
    "fp8_ragged_k172_n100": Case("fp8", 7, k=172, n=100, transposed=True, cfg=SMALL),
    "fp8_out_f32": Case("fp8", 16, transposed=True, out_dtype="float32"),
    "fp8_swap_ab_m40": Case("fp8", 40, transposed=True, cfg=SWAP),
}

# Cases whose features others already cover run with `pytest -m slow` (and on the GPU).
SLOW_CASES = {"int8_m3_transposed", "int8_m16_f32", "int8_m200_small_tiles",
              "int8_m64_g64_small_tiles_transposed", "int8_f16", "int8_out_f32",
              "int8_swap_ab_m3_g64_t", "fp8_m16_transposed", "fp8_m64", "fp8_out_f32"}
CASE_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
               for n in sorted(CASES)]


def build(case: Case, seed: int) -> tuple[jax.Array, quant.QuantArray]:
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (case.m, case.k), jnp.float32).astype(case.x_dtype)
    w = jax.random.normal(kw, (case.k, case.n), jnp.float32) * 0.02
    if case.kind == "int8":
        qa = quant.quantize_int8(w, group=case.group, transposed=case.transposed)
    else:
        qa = quant.quantize_fp8(w, transposed=case.transposed)
    return x, qa


def _run(case: Case, x, qa, *, interpret: bool, cfg=None) -> np.ndarray:
    q, s = quant.matmul_operands(qa, 1)
    kw = dict(transposed=case.transposed, out_dtype=case.out_dtype, interpret=interpret)
    cfg = cfg or case.cfg
    if cfg is not None:
        kw["cfg"] = cfg
    if case.kind == "int8":
        out = qm.int8_matmul(x, q, s, group=case.group, **kw)
    else:
        out = qm.fp8_matmul(x, q, s, **kw)
    assert out.dtype == jnp.dtype(case.out_dtype or case.x_dtype)
    return np.asarray(out.astype(jnp.float32))


def _reference(case: Case, x, qa) -> np.ndarray:
    q, s = quant.matmul_operands(qa, 1)
    kw = dict(transposed=case.transposed, out_dtype=case.out_dtype)
    if case.kind == "int8":
        out = qm.int8_matmul_reference(x, q, s, group=case.group, **kw)
    else:
        out = qm.fp8_matmul_reference(x, q, s, **kw)
    return np.asarray(out.astype(jnp.float32))


def _assert_close(got: np.ndarray, want: np.ndarray, dtype: str, *,
                  fp8_mma: bool = False) -> None:
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "NaN/inf in the output: an unmasked tail or unwritten tile"
    rel = max(TOL[dtype], FP8_MMA_TOL) if fp8_mma else TOL[dtype]
    tol = rel * float(np.sqrt(np.mean(want ** 2)))
    np.testing.assert_allclose(got, want, atol=tol, rtol=rel)


def _skip_unless_supported(interpret: bool, kind: str) -> None:
    if interpret:
        return
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    cc = float(getattr(jax.devices()[0], "compute_capability", "0"))
    if cc < 8.0:
        pytest.skip(f"needs sm80+, device is sm{cc}")
    if kind == "fp8" and cc < 8.9:
        pytest.skip(f"fp8 needs sm89+, device is sm{cc}")


class QMatmulCases:
    """The cases; subclasses choose compiled (GPU) or interpret mode."""

    INTERPRET = False

    @pytest.mark.parametrize("name", CASE_PARAMS)
    def test_matches_reference(self, name):
        case = CASES[name]
        _skip_unless_supported(self.INTERPRET, case.kind)
        x, qa = build(case, seed=zlib.crc32(name.encode()))
        got = _run(case, x, qa, interpret=self.INTERPRET)
        _assert_close(got, _reference(case, x, qa), case.out_dtype or case.x_dtype,
                      fp8_mma=case.kind == "fp8" and not self.INTERPRET)

    def test_reference_is_the_dequantized_product(self):
        """The references compute x @ dequantize(w) (fp8: with x through its e4m3 rounding)."""
        case = Case("int8", 5, group=64, x_dtype="float32")
        x, qa = build(case, seed=3)
        want = np.asarray(x) @ np.asarray(quant.dequantize(qa))
        np.testing.assert_allclose(_reference(case, x, qa), want, rtol=1e-5, atol=1e-4)
        case = Case("fp8", 5, x_dtype="float32", transposed=True)
        x, qa = build(case, seed=4)
        x_q, x_s = qm.quantize_rows_fp8(x)
        x_deq = np.asarray(x_q.astype(jnp.float32)) * np.asarray(x_s)[:, None]
        want = x_deq @ np.asarray(quant.dequantize(qa))
        np.testing.assert_allclose(_reference(case, x, qa), want, rtol=1e-5, atol=1e-4)

    @pytest.mark.slow
    def test_same_result_for_every_tiling(self):
        """Tiles, split-K and the layout change only the float32 summation order."""
        _skip_unless_supported(self.INTERPRET, "int8")
        base = Case("int8", 37, k=384, n=160, group=64, x_dtype="float32")
        x, qa = build(base, seed=11)
        want = _reference(base, x, qa)
        qt = quant.quantize_int8(quant.dequantize(qa), group=64, transposed=True)
        layouts = ((base, qa), (dataclasses.replace(base, transposed=True), qt))
        cfgs = (SMALL, SWAP, qm.QMatmulTuning(small=qm.MatmulBlocks(16, 64, 64, split_k=3),
                                              large=qm.MatmulBlocks(64, 64, 64, group_m=1),
                                              small_m_max=64))
        for i, cfg in enumerate(cfgs):
            case, w = layouts[i % 2]
            _assert_close(_run(case, x, w, interpret=self.INTERPRET, cfg=cfg), want, "float32")

    @pytest.mark.parametrize("m,transposed,x_dtype,cfg", [
        (1, False, "bfloat16", None), (16, True, "bfloat16", None),
        (5, False, "float32", SMALL), (200, False, "bfloat16", SMALL)])
    def test_dense_reads_the_layer_in_place(self, m, transposed, x_dtype, cfg):
        """A float weight stack [L, K, N] is read at `layer` (a traced index, as in the layer
        loop); ragged K/N tails masked."""
        _skip_unless_supported(self.INTERPRET, "int8")
        kx, kw = jax.random.split(jax.random.key(m))
        k, n, layers = 172, 100, 3
        x = jax.random.normal(kx, (m, k), jnp.float32).astype(x_dtype)
        w = (jax.random.normal(kw, (layers, n, k) if transposed else (layers, k, n)) * 0.02
             ).astype(x_dtype)
        kwargs = {} if cfg is None else {"cfg": cfg}
        run = jax.jit(lambda x, w, layer: qm.dense_matmul(
            x, w, layer=layer, transposed=transposed, interpret=self.INTERPRET, **kwargs))
        for layer in range(layers):
            got = run(x, w, jnp.int32(layer))
            assert got.dtype == x.dtype
            want = qm.dense_matmul_reference(x, w, layer=layer, transposed=transposed)
            _assert_close(np.asarray(got.astype(jnp.float32)),
                          np.asarray(want.astype(jnp.float32)), x_dtype)
        with pytest.raises(ValueError, match="share a float dtype"):
            qm.dense_matmul(x, w.astype(jnp.float16), layer=0, transposed=transposed,
                            interpret=True)

    def test_dense_eight_way_k_split(self):
        """The default decode plan on a narrow weight (2 column tiles, 8 K blocks) splits K 8
        ways; the 8 float32 partials sum to the reference product."""
        _skip_unless_supported(self.INTERPRET, "int8")
        k, n = 8 * qm.DENSE_DEFAULT.small.block_k, 100
        cfg = qm.DENSE_DEFAULT
        assert qm._plan(1, n, k, cfg.small, cfg.small_m_max, None, 2, 2, cfg.min_programs,
                        cfg.max_split).split == 8
        kx, kw = jax.random.split(jax.random.key(8))
        x = jax.random.normal(kx, (1, k), jnp.float32).astype(jnp.bfloat16)
        w = (jax.random.normal(kw, (2, k, n)) * 0.02).astype(jnp.bfloat16)
        got = qm.dense_matmul(x, w, layer=jnp.int32(1), interpret=self.INTERPRET)
        want = qm.dense_matmul_reference(x, w, layer=1)
        _assert_close(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)),
                      "bfloat16")

    def test_rejects_bad_arguments(self):
        x = jnp.zeros((4, 128), jnp.bfloat16)
        w = jnp.zeros((128, 64), jnp.int8)
        with pytest.raises(ValueError, match="int8"):
            qm.int8_matmul(x, w.astype(jnp.float32), jnp.ones(64), interpret=True)
        with pytest.raises(ValueError, match="per-channel scale"):
            qm.int8_matmul(x, w, jnp.ones(32), interpret=True)
        with pytest.raises(ValueError, match="group 48 must divide"):
            qm.int8_matmul(x, w, jnp.ones((2, 64)), group=48, interpret=True)
        with pytest.raises(ValueError, match="contraction mismatch"):
            qm.int8_matmul(x, w, jnp.ones(128), transposed=True, interpret=True)
        with pytest.raises(ValueError, match="float8_e4m3fn"):
            qm.fp8_gemm(x, jnp.ones(4), w, jnp.ones(64), interpret=True)


@pytest.mark.gpu
class TestQMatmul(QMatmulCases):
    INTERPRET = False


class TestQMatmulInterpret(QMatmulCases):
    INTERPRET = True


LOWERING = {
    "int8_decode_m1": ("int8", 1, 4096, 14336, None, False, "bfloat16"),
    "int8_decode_m16_g128": ("int8", 16, 4096, 14336, 128, False, "bfloat16"),
    "int8_decode_m16_transposed": ("int8", 16, 4096, 14336, None, True, "bfloat16"),
    "int8_prefill_m512_g64_t": ("int8", 512, 14336, 4096, 64, True, "bfloat16"),
    "int8_prefill_ragged_f32": ("int8", 300, 172, 100, None, False, "float32"),
    "fp8_decode_m8": ("fp8", 8, 4096, 14336, None, True, "bfloat16"),
    "fp8_prefill_m4096": ("fp8", 4096, 8192, 8192, None, True, "bfloat16"),
    "fp8_prefill_kn_ragged": ("fp8", 200, 172, 100, None, False, "bfloat16"),
}


@pytest.mark.parametrize("name", sorted(LOWERING))
def test_lowers_for_cuda(name):
    """The Triton lowering (Python side) accepts the kernels at serving shapes."""
    kind, m, k, n, group, t, dt = LOWERING[name]
    sds = jax.ShapeDtypeStruct
    wdt = jnp.int8 if kind == "int8" else jnp.float8_e4m3fn
    w = sds((n, k) if t else (k, n), wdt)
    s = sds((n,) if group is None else (k // group, n), jnp.float32)
    if kind == "int8":
        def f(x, w, s):
            return qm.int8_matmul(x, w, s, group=group, transposed=t)
    else:
        def f(x, w, s):
            return qm.fp8_matmul(x, w, s, transposed=t)
    lowered = jax.jit(f).trace(sds((m, k), jnp.dtype(dt)), w, s).lower(
        lowering_platforms=("cuda",))
    assert f"{kind}_matmul" in lowered.as_text()


def test_dense_lowers_for_cuda():
    """The float-weight kernel at decode shapes of the 8B model (a layer of a stacked weight)."""
    sds = jax.ShapeDtypeStruct
    lowered = jax.jit(lambda x, w, i: qm.dense_matmul(x, w, layer=i)).trace(
        sds((16, 4096), jnp.bfloat16), sds((32, 4096, 14336), jnp.bfloat16),
        sds((), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "dense_matmul" in lowered.as_text()


def test_dense_decode_plan_fills_the_gpu():
    """Few columns: 64-wide tiles, then K split 2, 4 or 8 ways, until ~100 programs stream the
    weight; many columns keep the 128-wide tiles (the measured best at N = 14336)."""
    cfg = qm.DENSE_DEFAULT
    plan = lambda m, k, n: qm._plan(m, n, k, cfg.small, 64, None, 2, 2,  # noqa: E731
                                    cfg.min_programs, cfg.max_split)
    assert (plan(1, 4096, 14336).bn, plan(1, 4096, 14336).split) == (128, 1)
    assert (plan(1, 4096, 7168).bn, plan(1, 4096, 7168).split) == (64, 1)
    assert (plan(32, 4096, 4096).bn, plan(32, 4096, 4096).split) == (64, 2)
    assert (plan(1, 4096, 2048).bn, plan(1, 4096, 2048).split) == (64, 4)  # tp=2 q shard
    assert (plan(1, 4096, 1024).bn, plan(1, 4096, 1024).split) == (64, 8)  # k, v
    assert (plan(1, 4096, 512).bn, plan(1, 4096, 512).split) == (64, 8)  # capped at max_split
    assert plan(1, 4096 + 128, 512).split == 1  # 33 K steps: no even split, one program
    assert (plan(128, 4096, 4096).bn, plan(128, 4096, 4096).split) == (128, 1)  # tiled regime


def test_quantized_decode_plans_fill_the_gpu():
    """int8 and fp8 take the dense decode rule: the 1B shape's k/v projection (N = 512) was 4
    programs at 128-wide tiles; now 64-wide tiles and K split until ~100 programs."""
    for cfg in (qm.INT8_DEFAULT, qm.FP8_DEFAULT):
        def plan(m, k, n, cfg=cfg):
            return qm._plan(m, n, k, cfg.small, cfg.small_m_max, None, 2, 1, cfg.min_programs,
                            cfg.max_split)
        assert (plan(1, 2048, 512).bn, plan(1, 2048, 512).split) == (64, 8)  # k, v
        assert (plan(32, 8192, 2048).bn, plan(32, 8192, 2048).split) == (64, 4)  # down
        assert (plan(1, 4096, 14336).bn, plan(1, 4096, 14336).split) == (128, 1)
    c = qm.INT8_DEFAULT  # group-wise int8 splits by whole groups too
    assert qm._plan(1, 512, 2048, c.small, c.small_m_max, 128, 2, 1, c.min_programs,
                    c.max_split).split == 8


def test_tiles_shrink_to_fit_shared_memory():
    """The decode tuning (tuned at M = 16) still plans a launch that fits at M = 64, where the
    row tile is 64 deep (an H100 refused 128 x 256 tiles with 4 stages there)."""
    blocks = qm.INT8_DEFAULT.small
    for m, group in ((16, None), (64, None), (64, 128)):
        p = qm._plan(m, 14336, 4096, blocks, 64, group, 2, 1)
        assert qm._smem_estimate(p.bm, p.bn, p.bk, p.num_stages, 2, 1) <= qm.SMEM_BUDGET
        assert p.num_stages >= 2 and p.bm == max(16, m)
    p16 = qm._plan(16, 14336, 4096, blocks, 64, None, 2, 1)
    assert (p16.bn, p16.bk, p16.num_stages) == (blocks.block_n, blocks.block_k,
                                                blocks.num_stages)  # measured: left alone
