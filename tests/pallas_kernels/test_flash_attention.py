"""The prefill flash-attention kernel against the paged reference.

Each case builds a page pool with a shuffled block table per row and rows of three kinds: a
chunk starting at position 0, a chunk starting after cached pages (chunked prefill or a prefix
hit), and a padding row (seq_len 0). Lengths are ragged and not multiples of the page or block
size. Everything the kernel must not read is poisoned: pages outside any sequence, table
entries past a sequence, the unused slots of each last page (NaN for float and fp8 pages, NaN
scales for quantized ones). The reference gets the same pool with the poison replaced by zeros
(it reads whole pages), and the output is poisoned before the call so an unwritten element
fails the comparison.

`TestFlashAttention` compiles for the GPU (marked `gpu`; fp8 needs sm89) and
`TestFlashAttentionInterpret` runs the same cases on CPU in interpret mode (the classes carry a
`Test` prefix so pytest's default collection finds them; the gpu mark sits on the compiled class
only, since pytest marks are inherited). Cases with `SMALL` tiles get several q blocks and
KV blocks out of tiny shapes, so the unmasked fast path and both masked edges all run.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention as fa

# Per-dtype tolerance of the kernel against the reference (outputs are O(1) averages of V).
# bf16: the reference rounds dequantized keys and the probabilities to bf16 at other points
# than the kernel; f32 runs exact-f32 dots (no TF32) on both sides.
ATOL = {"float32": 2e-5, "bfloat16": 3e-2}
RTOL = {"float32": 2e-5, "bfloat16": 3e-2}
# 8-bit pages: both sides dequantize exactly; only the f32 accumulation order differs.
ATOL_Q8_F32 = 1e-4
SMALL = fa.FlashTuning(block_q=16, block_kv=16, num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class Case:
    page_size: int = 16
    kv_heads: int = 2
    group: int = 1  # q heads per kv head
    head_dim: int = 32
    chunk: int = 32  # T, the padded bucket
    rows: tuple[tuple[int, int], ...] = ((0, 27), (37, 19), (0, 0))  # (start, new tokens)
    q_dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    window: int | None = None
    pad_positions: str = "beyond"  # padding queries: "beyond" seq_len, or "zero" (the runner)
    cfg: fa.FlashTuning = fa.DEFAULT


CASES = {
    "g16_mha_d64": Case(head_dim=64),
    "g8_gqa4": Case(page_size=8, group=4),
    "g16_gqa8_mqa": Case(kv_heads=1, group=8),
    "g8_gqa2_f32_d128": Case(page_size=8, group=2, head_dim=128, q_dtype="float32",
                             kv_dtype="float32"),
    "int8_gqa4": Case(group=4, kv_dtype="int8"),
    "int8_f32q": Case(page_size=8, group=2, q_dtype="float32", kv_dtype="int8"),
    "fp8_g8": Case(page_size=8, group=4, kv_dtype="float8_e4m3fn"),
    "bf16q_f32kv": Case(page_size=8, kv_dtype="float32"),
    "window_g8_gqa4": Case(page_size=8, group=4, window=6),
    "window_mid_seq": Case(rows=((0, 13), (50, 31), (3, 5)), window=20),
    "small_tiles": Case(page_size=8, group=4, rows=((0, 29), (45, 31), (0, 0)), cfg=SMALL),
    "small_tiles_window_int8": Case(page_size=16, group=2, rows=((21, 30), (0, 32)), window=11,
                                    kv_dtype="int8", cfg=SMALL),
    "block_kv_32_over_pages_of_8": Case(page_size=8, rows=((0, 30), (70, 23)),
                                        cfg=fa.FlashTuning(block_q=16, block_kv=32)),
    "unpacked_heads": Case(group=4, cfg=dataclasses.replace(SMALL, pack_heads=False)),
    "chunk_not_pow2_runner_padding": Case(chunk=24, rows=((0, 17), (40, 24), (9, 3)),
                                          pad_positions="zero"),
    "single_token_rows": Case(chunk=16, rows=((0, 1), (63, 1), (0, 0)), group=2),
}

# Cases whose features others already cover run with `pytest -m slow` (and on the GPU).
SLOW_CASES = {"g16_gqa8_mqa", "int8_f32q", "window_g8_gqa4", "small_tiles", "unpacked_heads",
              "bf16q_f32kv"}
CASE_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
               for n in sorted(CASES)]


def _poison(dtype: str) -> float:
    """What unused page slots hold: NaN where the dtype has one, else a large value."""
    return 127.0 if dtype == "int8" else float("nan")


def build(case: Case, seed: int) -> dict:
    """Random inputs for `case`: the poisoned pool for the kernel, a clean one for the
    reference, and which query tokens are real."""
    rng = np.random.default_rng(seed)
    g, kh, hd, t = case.page_size, case.kv_heads, case.head_dim, case.chunk
    n = kh * case.group
    lens = [s + m if m else 0 for s, m in case.rows]
    pages_per_row = [-(-x // g) for x in lens]
    width = max(max(pages_per_row) + 2, 2)  # slack entries past each sequence
    num_layers, layer = 2, 1
    num_pages = sum(pages_per_row) + 6  # spare pages nobody owns
    ids = rng.permutation(num_pages)
    tables = np.zeros((len(lens), width), np.int32)
    used = np.zeros((num_pages, g), bool)  # which page slots hold real tokens
    nxt = 0
    for i, np_ in enumerate(pages_per_row):
        tables[i, :np_] = ids[nxt: nxt + np_]
        nxt += np_
        for j in range(np_):
            used[tables[i, j], : min(g, lens[i] - j * g)] = True
    spare = ids[nxt:]
    for i, np_ in enumerate(pages_per_row):  # entries past the sequence point at spare pages
        tables[i, np_:] = rng.choice(spare, width - np_)

    shape = (num_layers, kh, num_pages, g, hd)
    quantized = case.kv_dtype in ("int8", "float8_e4m3fn")
    mask = np.broadcast_to(used[None, None, :, :, None], shape)
    out = dict(tables=tables, lens=np.asarray(lens, np.int32), layer=layer)
    for name in ("k", "v"):
        if case.kv_dtype == "int8":
            x = rng.integers(-127, 128, shape).astype(np.int8)
        else:
            x = rng.normal(size=shape).astype(np.float32)
        clean = np.where(mask, x, 0).astype(x.dtype)
        dirty = np.where(mask, x, _poison(case.kv_dtype)).astype(x.dtype)
        out[name + "_ref"] = jnp.asarray(clean, case.kv_dtype)
        out[name] = jnp.asarray(dirty, case.kv_dtype)
        if quantized:
            sc = rng.uniform(0.005, 0.02, (num_layers, kh, num_pages)).astype(np.float32)
            if case.kv_dtype == "float8_e4m3fn":
                sc *= 20  # e4m3 values are O(1): keep dequantized keys O(1)
            page_used = used.any(axis=1)[None, None, :]
            out[name + "_scale_ref"] = jnp.asarray(np.where(page_used, sc, 0.0))
            out[name + "_scale"] = jnp.asarray(np.where(page_used, sc, np.nan))
        else:
            out[name + "_scale_ref"] = out[name + "_scale"] = None
    out["q"] = jnp.asarray(rng.normal(size=(len(lens), t, n, hd)), case.q_dtype)
    pos = np.zeros((len(lens), t), np.int32)
    real = np.zeros((len(lens), t), bool)
    for i, (s, m) in enumerate(case.rows):
        pos[i, :m] = s + np.arange(m)
        real[i, :m] = True
        if case.pad_positions == "beyond":
            pos[i, m:] = lens[i] + np.arange(t - m)
    out["positions"], out["real"] = jnp.asarray(pos), real
    return out


def _tolerance(case: Case) -> tuple[float, float]:
    if case.q_dtype == "float32" and case.kv_dtype in ("int8", "float8_e4m3fn"):
        return ATOL_Q8_F32, ATOL_Q8_F32
    return ATOL[case.q_dtype], RTOL[case.q_dtype]


def _call_kernel(x: dict, case: Case, interpret: bool, cfg: fa.FlashTuning) -> np.ndarray:
    out = fa.flash_prefill_attention(
        x["q"], x["k"], x["v"], x["layer"], jnp.asarray(x["tables"]), jnp.asarray(x["lens"]),
        x["positions"], k_scale=x["k_scale"], v_scale=x["v_scale"],
        scale=case.head_dim ** -0.5, sliding_window=case.window, cfg=cfg, interpret=interpret)
    return np.asarray(out.astype(jnp.float32))


def _reference(x: dict, case: Case) -> np.ndarray:
    out = fa.flash_prefill_attention_reference(
        x["q"], x["k_ref"], x["v_ref"], x["layer"], jnp.asarray(x["tables"]),
        jnp.asarray(x["lens"]), x["positions"], k_scale=x["k_scale_ref"],
        v_scale=x["v_scale_ref"], scale=case.head_dim ** -0.5, sliding_window=case.window)
    return np.asarray(out.astype(jnp.float32))


def _skip_unless_supported(interpret: bool, kv_dtype: str) -> None:
    if interpret:
        return
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    cc = float(getattr(jax.devices()[0], "compute_capability", "0"))
    if cc < 8.0:
        pytest.skip(f"needs sm80+, device is sm{cc}")
    if kv_dtype == "float8_e4m3fn" and cc < 8.9:
        pytest.skip(f"float8 pages need sm89+, device is sm{cc}")


class FlashAttentionCases:
    """The cases; subclasses choose compiled (GPU) or interpret mode."""

    INTERPRET = False

    @pytest.mark.parametrize("name", CASE_PARAMS)
    def test_matches_reference(self, name):
        case = CASES[name]
        _skip_unless_supported(self.INTERPRET, case.kv_dtype)
        x = build(case, seed=zlib.crc32(name.encode()))
        got = _call_kernel(x, case, self.INTERPRET, case.cfg)
        want = _reference(x, case)
        assert got.shape == want.shape == x["q"].shape
        assert np.isfinite(got).all(), "NaN/inf in output (padding queries included)"
        pad_rows = x["lens"] == 0
        np.testing.assert_array_equal(got[pad_rows], 0.0)  # seq_len 0 rows: exact zeros
        atol, rtol = _tolerance(case)
        real = x["real"]
        np.testing.assert_allclose(got[real], want[real], atol=atol, rtol=rtol)

    @pytest.mark.slow
    def test_same_result_for_every_tiling(self):
        """The tiling changes only float summation order, never which keys a query sees."""
        case = Case(page_size=8, group=4, rows=((0, 31), (29, 32), (0, 0)), window=17,
                    q_dtype="float32", kv_dtype="float32")
        _skip_unless_supported(self.INTERPRET, case.kv_dtype)
        x = build(case, seed=7)
        want = _reference(x, case)
        for cfg in (SMALL, fa.FlashTuning(block_q=32, block_kv=64, num_warps=4),
                    dataclasses.replace(SMALL, pack_heads=False)):
            got = _call_kernel(x, case, self.INTERPRET, cfg)
            np.testing.assert_allclose(got[x["real"]], want[x["real"]], atol=2e-5, rtol=2e-5)

    def test_rejects_inconsistent_arguments(self):
        case = Case(kv_dtype="int8")
        x = build(case, seed=1)
        with pytest.raises(ValueError, match="k_scale"):
            fa.flash_prefill_attention(x["q"], x["k"], x["v"], 1, jnp.asarray(x["tables"]),
                                       jnp.asarray(x["lens"]), x["positions"], scale=0.1,
                                       interpret=True)
        with pytest.raises(ValueError, match="multiple"):
            fa.flash_prefill_attention(x["q"][:, :, :1].repeat(3, 2), x["k"], x["v"], 1,
                                       jnp.asarray(x["tables"]), jnp.asarray(x["lens"]),
                                       x["positions"], k_scale=x["k_scale"],
                                       v_scale=x["v_scale"], scale=0.1, interpret=True)
        with pytest.raises(ValueError, match="power of two"):
            fa.FlashTuning(block_kv=48)


@pytest.mark.gpu
class TestFlashAttention(FlashAttentionCases):
    INTERPRET = False


class TestFlashAttentionInterpret(FlashAttentionCases):
    INTERPRET = True


LOWERING = {
    "d128_bf16": dict(head_dim=128, kv_dtype="bfloat16", group=4),
    "d64_bf16_window": dict(head_dim=64, kv_dtype="bfloat16", group=4, window=4096),
    "d128_int8": dict(head_dim=128, kv_dtype="int8", group=4),
    "d64_int8_mha": dict(head_dim=64, kv_dtype="int8", group=1),
    "d128_fp8_gqa8": dict(head_dim=128, kv_dtype="float8_e4m3fn", group=8),
    "d64_f32": dict(head_dim=64, kv_dtype="float32", group=2, q_dtype="float32"),
}


@pytest.mark.parametrize("name", sorted(LOWERING))
@pytest.mark.parametrize("chunk", [16, 512])
def test_lowers_for_cuda(name, chunk):
    """The Triton lowering (Python side) accepts the kernel at serving shapes."""
    p = LOWERING[name]
    hd, group = p["head_dim"], p["group"]
    kv_dtype, q_dtype = jnp.dtype(p["kv_dtype"]), jnp.dtype(p.get("q_dtype", "bfloat16"))
    b, kh, pages, g, width = 4, 8, 4096, 16, 256
    sds = jax.ShapeDtypeStruct
    pool = sds((16, kh, pages, g, hd), kv_dtype)
    quantized = kv_dtype in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
    scales = sds((16, kh, pages), jnp.float32) if quantized else None

    def f(q, k, v, layer, bt, lens, pos, ks, vs):
        return fa.flash_prefill_attention(q, k, v, layer, bt, lens, pos, k_scale=ks,
                                          v_scale=vs, scale=hd ** -0.5,
                                          sliding_window=p.get("window"))

    lowered = jax.jit(f).trace(
        sds((b, chunk, kh * group, hd), q_dtype), pool, pool, sds((), jnp.int32),
        sds((b, width), jnp.int32), sds((b,), jnp.int32), sds((b, chunk), jnp.int32),
        scales, scales).lower(lowering_platforms=("cuda",))
    assert "flash_prefill_attention" in lowered.as_text()
