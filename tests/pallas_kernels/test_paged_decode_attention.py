"""The paged decode (flash-decoding) kernel against the paged reference.

Each case builds a page pool with shuffled, non-contiguous block tables and rows of several
kinds: ragged lengths that are not page multiples, a single-token sequence and a padding row
(seq_len 0). With T > 1 the T queries sit causally at the end of the sequence; a row shorter
than T has padding queries past its length. Everything the kernel must not read is poisoned:
pages nobody owns, table entries past a sequence (pointing at spare pages), the unused slots
of each last page (NaN for float and fp8 pages, NaN scales for unused quantized pages). The
reference gets the same pool with the poison replaced by zeros (it reads whole pages).

Interpret mode runs the grid as a loop on CPU, so shapes are tiny and the tuning is shrunk
(1-2 pages per block, explicit split counts) so that the main loop, the peeled last block and
the split combine all run. `TestPagedDecodeAttention` runs the same cases compiled on a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode_attention as pda
from pallas_kernels.paged_attention import paged_attention_reference

ATOL = {"float32": 2e-5, "bfloat16": 3e-2}
ATOL_Q8_F32 = 2e-4  # 8-bit pages, f32 queries: the same dequantized values, other sum order
SMALL = pda.DecodeTuning(pages_per_block=2, k_splits=2, num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class Case:
    page_size: int = 8
    kv_heads: int = 2
    group: int = 4  # q heads per kv head
    head_dim: int = 32
    t: int = 1  # query tokens per row
    rows: tuple[tuple[int, int], ...] = ((29, 1), (1, 1), (0, 0), (16, 1))  # (len, real queries)
    q_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    window: int | None = None
    cfg: pda.DecodeTuning = SMALL


CASES = {
    "g8_mha_bf16": Case(group=1),
    "g16_gqa4_f32": Case(page_size=16, q_dtype="float32", kv_dtype="float32",
                         rows=((45, 1), (0, 0), (1, 1))),
    "g8_gqa8_t4_bf16": Case(group=8, kv_heads=1, t=4, rows=((23, 4), (2, 2), (0, 0), (9, 4))),
    "g16_gqa4_int8_bf16_operands": Case(
        page_size=16, kv_dtype="int8", rows=((50, 1), (1, 1), (0, 0)),
        cfg=dataclasses.replace(SMALL, quantized_compute="query")),
    "g8_gqa4_int8_t4_f32q": Case(t=4, q_dtype="float32", kv_dtype="int8",
                                 rows=((27, 4), (3, 3), (0, 0))),
    "g16_gqa8_fp8": Case(page_size=16, group=8, kv_dtype="float8_e4m3fn",
                         rows=((37, 1), (0, 0), (1, 1))),
    "g8_mha_fp8_t4": Case(group=1, t=4, kv_dtype="float8_e4m3fn"),
    "window_g8_t1": Case(window=10, rows=((41, 1), (7, 1), (0, 0))),
    "window_g16_t4_3splits": Case(page_size=16, t=4, window=12, rows=((57, 4), (12, 4), (0, 0)),
                                  cfg=dataclasses.replace(SMALL, pages_per_block=1, k_splits=3)),
    "one_split_normalizes_in_kernel": Case(cfg=dataclasses.replace(SMALL, k_splits=1)),
    "one_split_combined_outside": Case(
        kv_dtype="int8", cfg=dataclasses.replace(SMALL, k_splits=1, normalize_single_split=False,
                                                 quantized_compute="float16")),
    "many_splits_int8_ppb1": Case(kv_dtype="int8", rows=((61, 1), (5, 1), (0, 0)),
                                  cfg=dataclasses.replace(SMALL, pages_per_block=1, k_splits=5)),
    "bf16q_f32kv_d64": Case(head_dim=64, kv_dtype="float32", group=2),
    "default_tuning_d128": Case(head_dim=128, group=2, cfg=pda.DEFAULT),
}

# Cases whose features others already cover run with `pytest -m slow` (and on the GPU).
SLOW_CASES = {"g8_mha_fp8_t4", "window_g8_t1", "one_split_combined_outside", "bf16q_f32kv_d64",
              "g8_gqa4_int8_t4_f32q"}
CASE_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
               for n in sorted(CASES)]


def build(case: Case, seed: int) -> dict:
    """Random inputs for `case`: a poisoned pool for the kernel, a clean one for the reference,
    and which query tokens are real."""
    rng = np.random.default_rng(seed)
    g, kh, hd, t = case.page_size, case.kv_heads, case.head_dim, case.t
    lens = [n for n, _ in case.rows]
    pages_per_row = [-(-n // g) for n in lens]
    width = max(pages_per_row) + 3  # slack entries past each sequence
    num_layers, layer = 2, 1
    num_pages = sum(pages_per_row) + 5  # spare pages nobody owns
    ids = rng.permutation(num_pages)
    tables = np.zeros((len(lens), width), np.int32)
    used = np.zeros((num_pages, g), bool)  # which page slots hold real tokens
    nxt = 0
    for i, npg in enumerate(pages_per_row):
        tables[i, :npg] = ids[nxt: nxt + npg]
        nxt += npg
        for j in range(npg):
            used[tables[i, j], : min(g, lens[i] - j * g)] = True
    spare = ids[nxt:]
    for i, npg in enumerate(pages_per_row):  # entries past the sequence point at spare pages
        tables[i, npg:] = rng.choice(spare, width - npg)

    shape = (num_layers, kh, num_pages, g, hd)
    quantized = case.kv_dtype in ("int8", "float8_e4m3fn")
    mask = np.broadcast_to(used[None, None, :, :, None], shape)
    out = dict(tables=jnp.asarray(tables), lens=jnp.asarray(lens, jnp.int32), layer=layer)
    for name in ("k", "v"):
        if case.kv_dtype == "int8":
            x = rng.integers(-127, 128, shape).astype(np.int8)
            poison = 127  # int8 has no NaN: a large wrong value instead
        else:
            x = rng.normal(size=shape).astype(np.float32)
            poison = np.nan
        out[name + "_ref"] = jnp.asarray(np.where(mask, x, 0).astype(x.dtype), case.kv_dtype)
        out[name] = jnp.asarray(np.where(mask, x, poison).astype(x.dtype), case.kv_dtype)
        if quantized:
            sc = rng.uniform(0.005, 0.02, (num_layers, kh, num_pages)).astype(np.float32)
            if case.kv_dtype == "float8_e4m3fn":
                sc *= 20  # e4m3 values are O(1): keep dequantized keys O(1)
            page_used = used.any(axis=1)[None, None, :]
            out[name + "_scale_ref"] = jnp.asarray(np.where(page_used, sc, 0.0))
            out[name + "_scale"] = jnp.asarray(np.where(page_used, sc, np.nan))
        else:
            out[name + "_scale_ref"] = out[name + "_scale"] = None
    out["q"] = jnp.asarray(rng.normal(size=(len(lens), t, kh * case.group, hd)), case.q_dtype)
    pos = np.zeros((len(lens), t), np.int32)
    real = np.zeros((len(lens), t), bool)
    for i, (n, m) in enumerate(case.rows):
        pos[i, :m] = n - m + np.arange(m)
        pos[i, m:] = n + np.arange(t - m)  # padding queries sit past the sequence
        real[i, :m] = True
    out["positions"], out["real"] = jnp.asarray(pos), real
    return out


def _tolerance(case: Case) -> float:
    if case.q_dtype == "float32" and case.kv_dtype in ("int8", "float8_e4m3fn"):
        return ATOL_Q8_F32
    return ATOL[case.q_dtype]


def call_kernel(x: dict, case: Case, interpret: bool, cfg: pda.DecodeTuning) -> np.ndarray:
    out = pda.paged_decode_attention(
        x["q"], x["k"], x["v"], x["layer"], x["tables"], x["lens"], x["positions"],
        k_scale=x["k_scale"], v_scale=x["v_scale"], scale=case.head_dim ** -0.5,
        sliding_window=case.window, cfg=cfg, interpret=interpret)
    assert out.dtype == x["q"].dtype
    return np.asarray(out.astype(jnp.float32))


def reference(x: dict, case: Case) -> np.ndarray:
    out = paged_attention_reference(
        x["q"], x["k_ref"], x["v_ref"], x["layer"], x["tables"], x["lens"], x["positions"],
        k_scale=x["k_scale_ref"], v_scale=x["v_scale_ref"], scale=case.head_dim ** -0.5,
        sliding_window=case.window)
    return np.asarray(out.astype(jnp.float32))


def skip_unless_supported(interpret: bool, kv_dtype: str) -> None:
    if interpret:
        return
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    cc = float(getattr(jax.devices()[0], "compute_capability", "0"))
    if cc < 8.0:
        pytest.skip(f"needs sm80+, device is sm{cc}")
    if kv_dtype == "float8_e4m3fn" and cc < 8.9:
        pytest.skip(f"float8 pages need sm89+, device is sm{cc}")


class PagedDecodeAttentionCases:
    """The cases; subclasses choose compiled (GPU) or interpret mode."""

    INTERPRET = False

    @pytest.mark.parametrize("name", CASE_PARAMS)
    def test_matches_reference(self, name):
        case = CASES[name]
        skip_unless_supported(self.INTERPRET, case.kv_dtype)
        x = build(case, seed=sum(map(ord, name)))
        got = call_kernel(x, case, self.INTERPRET, case.cfg)
        want = reference(x, case)
        assert got.shape == want.shape == x["q"].shape
        assert np.isfinite(got).all(), "NaN/inf in output (padding queries included)"
        np.testing.assert_array_equal(got[np.asarray(x["lens"]) == 0], 0.0)  # padding rows
        real = x["real"]
        np.testing.assert_allclose(got[real], want[real], atol=_tolerance(case),
                                   rtol=_tolerance(case))

    @pytest.mark.slow
    def test_same_result_for_every_tiling(self):
        """Blocks and splits change only the float summation order, never which keys a query
        sees (including empty splits: 6 splits over a 2-block sequence)."""
        case = Case(page_size=8, group=2, t=3, rows=((45, 3), (11, 3), (0, 0)), window=19,
                    q_dtype="float32", kv_dtype="float32")
        skip_unless_supported(self.INTERPRET, case.kv_dtype)
        x = build(case, seed=7)
        want = reference(x, case)
        for cfg in (pda.DecodeTuning(pages_per_block=1, k_splits=1),
                    pda.DecodeTuning(pages_per_block=2, k_splits=6),
                    pda.DecodeTuning(pages_per_block=4, k_splits=2)):
            got = call_kernel(x, case, self.INTERPRET, cfg)
            np.testing.assert_allclose(got[x["real"]], want[x["real"]], atol=2e-5, rtol=2e-5)

    def test_rejects_inconsistent_arguments(self):
        x = build(Case(kv_dtype="int8"), seed=1)
        args = (x["q"], x["k"], x["v"], 1, x["tables"], x["lens"], x["positions"])
        with pytest.raises(ValueError, match="k_scale"):
            pda.paged_decode_attention(*args, scale=0.1, interpret=True)
        with pytest.raises(ValueError, match="multiple"):
            pda.paged_decode_attention(x["q"][:, :, :3], *args[1:], k_scale=x["k_scale"],
                                       v_scale=x["v_scale"], scale=0.1, interpret=True)
        with pytest.raises(ValueError, match="power-of-two head dim"):
            pda.paged_decode_attention(x["q"][..., :24], x["k"][..., :24], x["v"][..., :24],
                                       *args[3:], k_scale=x["k_scale"], v_scale=x["v_scale"],
                                       scale=0.1, interpret=True)


@pytest.mark.gpu
class TestPagedDecodeAttention(PagedDecodeAttentionCases):
    INTERPRET = False


class TestPagedDecodeAttentionInterpret(PagedDecodeAttentionCases):
    INTERPRET = True


def test_tuning_heuristics():
    cfg = pda.DEFAULT
    # About 1024 programs in all (what streamed best on an H100): B=64 x 8 kv heads -> 2
    # splits, B=8 -> 16; never fewer than `min_blocks_per_split` blocks per split.
    assert pda.choose_splits(cfg, 64 * 8, 2048 // 64) == 2
    assert pda.choose_splits(cfg, 8 * 8, 16384 // 64) == 16
    assert pda.choose_splits(cfg, 8, 3) == 1  # too few blocks to split
    assert pda.choose_splits(dataclasses.replace(cfg, k_splits=7), 8, 3) == 3  # capped
    # 64 tokens per block for 16-bit pages, 128 for 8-bit, 32 for f32; capped by the table;
    # at least 16 tokens (a dot's minimum).
    assert pda.block_pages(cfg, 16, 2, 128) == 4
    assert pda.block_pages(cfg, 16, 1, 128) == 8
    assert pda.block_pages(cfg, 16, 2, 2) == 2
    assert pda.block_pages(cfg, 8, 4, 128) == 4
    assert pda.block_pages(dataclasses.replace(cfg, pages_per_block=1), 8, 2, 128) == 2


LOWERING = [(hd, kv, t) for hd in (64, 128) for kv in ("bfloat16", "int8") for t in (1, 4)]


@pytest.mark.parametrize("head_dim,kv_dtype,t", LOWERING)
def test_lowers_for_cuda(head_dim, kv_dtype, t):
    """The Triton lowering (Python side) accepts the kernel at serving shapes, for both the
    one-split (in-kernel normalize) and the split-K (combine) variants."""
    b, kh, group, pages, g, width = 8, 8, 4, 4096, 16, 1024
    sds = jax.ShapeDtypeStruct
    pool = sds((16, kh, pages, g, head_dim), jnp.dtype(kv_dtype))
    scales = sds((16, kh, pages), jnp.float32) if kv_dtype == "int8" else None
    for cfg in (pda.DEFAULT, dataclasses.replace(pda.DEFAULT, k_splits=1)):
        def f(q, k, v, layer, bt, lens, pos, ks, vs, cfg=cfg):
            return pda.paged_decode_attention(q, k, v, layer, bt, lens, pos, k_scale=ks,
                                              v_scale=vs, scale=head_dim ** -0.5, cfg=cfg)

        lowered = jax.jit(f).trace(
            sds((b, t, kh * group, head_dim), jnp.bfloat16), pool, pool, sds((), jnp.int32),
            sds((b, width), jnp.int32), sds((b,), jnp.int32), sds((b, t), jnp.int32),
            scales, scales).lower(lowering_platforms=("cuda",))
        assert "paged_decode_attention" in lowered.as_text()


def test_ops_routes_decode_to_the_kernel():
    """`jaxinfer.ops.paged_attention` with kernels="pallas" and T = 1 runs this kernel
    (interpret mode on CPU) and agrees with kernels="reference"."""
    from jaxinfer import ops

    case = Case(rows=((21, 1), (0, 0), (3, 1)))
    x = build(case, seed=3)
    kw = dict(scale=case.head_dim ** -0.5, sliding_window=None)
    args = (x["q"], x["k_ref"], x["v_ref"], 1, x["tables"], x["lens"], x["positions"])
    got = ops.paged_attention(*args, **kw, kernels="pallas")
    want = ops.paged_attention(*args, **kw, kernels="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=3e-2, rtol=3e-2)
