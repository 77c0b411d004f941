"""The group-wise int4 matmul kernel against its reference, and the int4 packing.

Operands are drawn directly (uniform codes and zero points in 0..15, scales of a N(0, 0.02)
weight's size); x ~ N(0, 1). Cases: decode M (1, one row tile padded by masked loads), several row
tiles (M = 40 with 16-row tiles), a stacked weight read at a traced layer index, ragged N (a
masked column tail), a short last group (K = 448 = 3 x 128 + 64, the demo model's FFN) and one
whose half is not a power of two (K = 172, group 64: a 22-byte half loaded 32 wide, masked),
bf16 / f16 / f32 activations. The reference itself is checked against a plain numpy
dequantization. `TestInt4Matmul` compiles for the GPU (marked `gpu`); the interpret subclass
runs the same cases on CPU; `test_int4_lowers_for_cuda` runs the Triton lowering at serving
shapes.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import quant
from pallas_kernels import int4_matmul as k4

# Relative to the output RMS: float32 sums of exact products in another order; bf16/f16 outputs
# add one final rounding.
TOL = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 2e-3}
SMALL = k4.Int4Tuning(block_m=16, block_n=32, num_stages=2)


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int = 256
    n: int = 192
    group: int = 128
    layers: int | None = None  # a stacked [L, N, K / 2] weight, read at its last layer
    x_dtype: str = "bfloat16"
    cfg: k4.Int4Tuning = k4.DEFAULT


CASES = {
    "m1": Case(1),
    "m40_small_tiles_f32": Case(40, x_dtype="float32", cfg=SMALL),
    "stacked_k448_short_group_ragged_n": Case(3, k=448, n=100, layers=3, x_dtype="float32"),
    "k172_g64_half_not_pow2_f16": Case(5, k=172, n=48, group=64, x_dtype="float16", cfg=SMALL),
    # the decode plan: one 64-wide column tile, so the 4 groups split over 4 programs
    "m3_groups_split_4_ways_stacked": Case(3, k=512, n=64, layers=2),
    # above small_m_max: 16-row tiles, ragged M and N
    "m80_row_tiles_ragged": Case(80, n=100, cfg=SMALL),
}


def build(case: Case, seed: int):
    """x and the kernel operands (packed codes, scales, zero points) drawn directly: uniform
    codes and zero points in 0..15, scales like a N(0, 0.02) weight's (range / 15)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((case.m, case.k)), jnp.float32).astype(case.x_dtype)
    lead = () if case.layers is None else (case.layers,)
    g = k4.num_groups(case.k, case.group)
    q = k4.pack_int4(jnp.asarray(rng.integers(0, 16, (*lead, case.n, case.k))), case.group)
    scale = jnp.asarray(rng.uniform(0.005, 0.012, (*lead, g, case.n)), jnp.float32)
    zero = jnp.asarray(rng.integers(0, 16, (*lead, g, case.n)), jnp.int8)
    return x, (q, scale, zero)


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    for k, group in ((256, 128), (448, 128), (172, 64), (64, 128)):
        q = rng.integers(0, 16, (3, k))
        packed = k4.pack_int4(jnp.asarray(q), group)
        assert packed.dtype == jnp.uint8 and packed.shape == (3, k // 2)
        np.testing.assert_array_equal(np.asarray(k4.unpack_int4(packed, group)), q)
    # The unit layout: byte i of a 128-row unit holds rows i (low nibble) and 64 + i (high).
    q = np.zeros((1, 128), np.int32)
    q[0, 3], q[0, 67] = 5, 9
    assert int(k4.pack_int4(jnp.asarray(q), 128)[0, 3]) == 5 | 9 << 4
    with pytest.raises(ValueError, match="even contraction"):
        k4.pack_int4(jnp.zeros((2, 7), jnp.int32), 128)


def test_reference_is_the_numpy_dequantized_product():
    """Against numpy, and against `jaxinfer.quant.dequantize` of a quantized weight (the same
    unpacking the model's weights go through)."""
    case = Case(4, k=448, n=40, x_dtype="float32")
    x, (q, s, z) = build(case, seed=1)
    rows = np.arange(case.k) // case.group
    codes = np.asarray(k4.unpack_int4(q, case.group))  # [N, K]
    w = (codes - np.asarray(z)[rows].T) * np.asarray(s)[rows].T  # [N, K]
    got = k4.int4_matmul_reference(x, q, s, z, group=case.group)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ w.T, rtol=1e-5, atol=1e-5)
    qa = quant.quantize_int4(jnp.asarray(w.T, jnp.float32), group=case.group)
    q2, s2 = quant.matmul_operands(qa, 1)
    np.testing.assert_allclose(np.asarray(k4.dequantize_int4(q2, s2, quant.matmul_zero(qa),
                                                            case.group)).T,
                               np.asarray(quant.dequantize(qa)), rtol=1e-6, atol=1e-8)


class Int4MatmulCases:
    INTERPRET = False

    def _skip(self):
        if self.INTERPRET:
            return
        if jax.default_backend() != "gpu":
            pytest.skip("needs an NVIDIA GPU")
        cc = float(getattr(jax.devices()[0], "compute_capability", "0"))
        if cc < 8.0:
            pytest.skip(f"needs sm80+, device is sm{cc}")

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_reference(self, name):
        self._skip()
        case = CASES[name]
        x, (q, s, z) = build(case, seed=zlib.crc32(name.encode()))
        layer = None if case.layers is None else case.layers - 1
        run = jax.jit(lambda x, q, s, z, i: k4.int4_matmul(
            x, q, s, z, group=case.group, layer=i, cfg=case.cfg, interpret=self.INTERPRET))
        got = run(x, q, s, z, None if layer is None else jnp.int32(layer))
        want = k4.int4_matmul_reference(x, q, s, z, group=case.group, layer=layer)
        assert got.dtype == x.dtype and got.shape == (case.m, case.n)
        got, want = (np.asarray(a.astype(jnp.float32)) for a in (got, want))
        assert np.isfinite(got).all(), "NaN/inf: an unmasked tail or unwritten tile"
        tol = TOL[case.x_dtype]
        np.testing.assert_allclose(got, want, rtol=tol,
                                   atol=tol * float(np.sqrt(np.mean(want ** 2))))

    def test_rejects_bad_arguments(self):
        x = jnp.zeros((2, 256), jnp.bfloat16)
        q = jnp.zeros((64, 128), jnp.uint8)
        s, z = jnp.ones((2, 64)), jnp.zeros((2, 64), jnp.int8)
        with pytest.raises(ValueError, match="uint8"):
            k4.int4_matmul(x, q.astype(jnp.int8), s, z, group=128, interpret=True)
        with pytest.raises(ValueError, match="scale must be"):
            k4.int4_matmul(x, q, jnp.ones((1, 64)), z, group=128, interpret=True)
        with pytest.raises(ValueError, match="contraction mismatch"):
            k4.int4_matmul(x[:, :128], q, s, z, group=128, interpret=True)
        with pytest.raises(ValueError, match="power of two"):
            k4.int4_matmul(x, q, jnp.ones((6, 64)), jnp.zeros((6, 64), jnp.int8), group=48,
                           interpret=True)


@pytest.mark.gpu
class TestInt4Matmul(Int4MatmulCases):
    INTERPRET = False


class TestInt4MatmulInterpret(Int4MatmulCases):
    INTERPRET = True


def test_decode_plan_fills_the_gpu():
    """At decode one row tile covers M; few columns get 64-wide tiles and then the groups split
    2, 4 or 8 ways until ~264 programs stream the weight (the 1B shape's projections)."""
    def plan(m, k, n):
        return k4._plan(m, n, k, 128, k4.DEFAULT)
    assert (plan(1, 2048, 512).bm, plan(1, 2048, 512).bn, plan(1, 2048, 512).split) == (16, 64, 8)
    assert (plan(64, 8192, 2048).bm, plan(64, 8192, 2048).split) == (64, 8)  # down
    assert (plan(32, 2048, 8192).bn, plan(32, 2048, 8192).split) == (64, 4)  # gate/up: 512
    assert plan(1, 2048 + 64, 512).split == 1  # a short last group: one program along K
    big = plan(65, 2048, 512)  # past small_m_max: 16-row tiles, no split
    assert (big.bm, big.bn, big.split) == (16, 128, 1)
    p = plan(1, 8192, 2048)
    assert p.split * p.steps == 8192 // 128


@pytest.mark.parametrize("m,k,n,layers", [(1, 4096, 14336, None), (16, 4096, 14336, 32),
                                          (32, 448, 256, 5)])
def test_int4_lowers_for_cuda(m, k, n, layers):
    """The Triton lowering (Python side) accepts the kernel at serving shapes, stacked too."""
    sds = jax.ShapeDtypeStruct
    lead = () if layers is None else (layers,)
    g = k4.num_groups(k, 128)
    args = [sds((m, k), jnp.bfloat16), sds((*lead, n, k // 2), jnp.uint8),
            sds((*lead, g, n), jnp.float32), sds((*lead, g, n), jnp.int8),
            None if layers is None else sds((), jnp.int32)]
    lowered = jax.jit(lambda x, q, s, z, i: k4.int4_matmul(x, q, s, z, group=128, layer=i)
                      ).trace(*args).lower(lowering_platforms=("cuda",))
    assert "int4_matmul" in lowered.as_text()
