"""Quantized KV writes: per-page-per-head scales that stay valid while pages fill.

The oracle is the float values themselves: after any sequence of writes, every written slot
dequantizes to its float value within the format's rounding, once per write that touched its
page (the first quantization, then one requantization per later growth): int8 half a step of
the page's final scale each, e4m3 2^-4 of the value each (3 mantissa bits). Each page's scale
is exactly amax(page) / qmax. Pages, heads and layers nobody wrote stay
bit-identical; padding slots are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_write import QMAX, write_pages_quantized
from pallas_kernels.paged_attention import gather_pages, paged_attention_reference

DTYPES = ("int8", "float8_e4m3fn")
L, K, P, G, H = 2, 2, 24, 4, 8
LAYER = 1

write = jax.jit(write_pages_quantized)


def tolerance(dtype: str, page_amax: np.ndarray, x: np.ndarray, writes: int) -> np.ndarray:
    """Largest allowed |dequantized - float| for slots x [..., K, H] of a page with this amax
    [K] that `writes` calls touched (each may round the slot once more)."""
    step = page_amax[:, None] / QMAX[jnp.dtype(dtype)]  # [K, 1]
    if dtype == "int8":
        return 1.01 * writes * 0.5 * step + 0 * x
    return 1.01 * writes * (2.0 ** -4 * np.abs(x) + 2.0 ** -9 * step)  # + e4m3 subnormals


def empty_cache(dtype: str, rng: np.random.Generator | None = None):
    """A cache whose pages and scales hold stale garbage (pages are reused after being
    freed), so a write that ignores 'start fresh' shows up."""
    rng = rng or np.random.default_rng(0)
    pages = rng.integers(-100, 100, (L, K, P, G, H)).astype(np.int8)
    pages = jnp.asarray(pages) if dtype == "int8" else jnp.asarray(pages / 8.0, dtype)
    scales = jnp.asarray(rng.uniform(1.0, 5.0, (L, K, P)), jnp.float32)
    return pages, scales


def slots_for(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return (table[positions // G] * G + positions % G).astype(np.int32)


def check_sequence(pages, scales, dtype, table, x, writes=None):
    """The sequence x [S, K, H] stored through `table` dequantizes back within tolerance, and
    each page's scale is amax / qmax. `writes[j]`: calls that touched page j (default 1)."""
    s = x.shape[0]
    deq = np.asarray(gather_pages(pages, LAYER, jnp.asarray(table[None]), scales))[0, :s]
    qmax = QMAX[jnp.dtype(dtype)]
    for j in range(-(-s // G)):
        chunk = x[j * G: (j + 1) * G]  # [<=G, K, H]
        amax = np.abs(chunk).max(axis=(0, 2))  # [K]
        np.testing.assert_allclose(np.asarray(scales)[LAYER, :, table[j]], amax / qmax,
                                   rtol=1e-6)
        err = np.abs(deq[j * G: (j + 1) * G] - chunk)
        tol = tolerance(dtype, amax, chunk, 1 if writes is None else writes[j])
        assert (err <= tol).all(), (j, err.max(), amax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [None, (3, 6, 2, 4)], ids=["token_by_token", "chunks"])
def test_sequence_written_in_steps_dequantizes_back(dtype, chunks):
    rng = np.random.default_rng(1)
    s = 15
    # growing magnitudes force scales to grow (and pages to be requantized) as pages fill
    x = (rng.standard_normal((s, K, H)) * np.linspace(0.2, 4.0, s)[:, None, None]).astype(
        np.float32)
    table = np.array([17, 3, 11, 6], np.int32)
    pages, scales = empty_cache(dtype, rng)
    bounds = np.cumsum((0,) + (chunks or (1,) * s))
    for a, b in zip(bounds[:-1], bounds[1:]):
        pos = np.arange(a, b)
        pages, scales = write(pages, scales, LAYER, jnp.asarray(x[None, a:b]),
                              jnp.asarray(slots_for(table, pos)[None]))
    writes = [sum(a < (j + 1) * G and b > j * G for a, b in zip(bounds[:-1], bounds[1:]))
              for j in range(len(table))]
    check_sequence(pages, scales, dtype, table, x, writes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_of_rows_others_untouched_padding_dropped(dtype):
    """Two rows decode/verify in one call (T = 3, one row padded); a bystander sequence's
    pages, the other layer and unused pages stay bit-identical."""
    rng = np.random.default_rng(2)
    pages, scales = empty_cache(dtype, rng)
    tables = [np.array([4, 9, 20, 22], np.int32), np.array([13, 1], np.int32)]
    lens = [10, 5]
    xs = [rng.standard_normal((n + 3, K, H)).astype(np.float32) for n in lens]
    for t, n, x in zip(tables, lens, xs):  # prompt writes, one row at a time
        pages, scales = write(pages, scales, LAYER, jnp.asarray(x[None, :n]),
                              jnp.asarray(slots_for(t, np.arange(n))[None]))
    before_pages, before_scales = np.asarray(pages), np.asarray(scales)
    new = np.zeros((2, 3, K, H), np.float32)
    slots = np.full((2, 3), -1, np.int32)
    new[0] = xs[0][10:13]
    slots[0] = slots_for(tables[0], np.arange(10, 13))
    new[1, :2] = xs[1][5:7] * 3  # grows row 1's page: its first tokens get requantized
    slots[1, :2] = slots_for(tables[1], np.arange(5, 7))
    new[1, 2] = 1e6  # padding token with a huge value: must be dropped, not grow a scale
    pages, scales = write(pages, scales, LAYER, jnp.asarray(new), jnp.asarray(slots))
    xs[1][5:7] *= 3
    check_sequence(pages, scales, dtype, tables[0], xs[0][:13], writes=[1, 1, 2, 1])
    check_sequence(pages, scales, dtype, tables[1], xs[1][:7], writes=[1, 2])
    touched = np.zeros(P, bool)
    touched[[20, 22, 1]] = True  # pages written this call
    after_pages, after_scales = np.asarray(pages), np.asarray(scales)
    untouched = ~touched
    np.testing.assert_array_equal(after_pages[:, :, untouched].view(np.uint8),
                                  before_pages[:, :, untouched].view(np.uint8))
    np.testing.assert_array_equal(after_scales[:, :, untouched], before_scales[:, :, untouched])
    np.testing.assert_array_equal(after_pages[0].view(np.uint8), before_pages[0].view(np.uint8))
    np.testing.assert_array_equal(after_scales[0], before_scales[0])


def test_reused_page_starts_fresh():
    """A page freed by a loud sequence and reused by a quiet one gets the quiet scale: the
    write at offset 0 ignores the old scale."""
    rng = np.random.default_rng(3)
    pages, scales = empty_cache("int8", rng)
    loud = rng.standard_normal((1, G, K, H)).astype(np.float32) * 100
    slots = jnp.asarray(slots_for(np.array([5]), np.arange(G))[None])
    pages, scales = write(pages, scales, LAYER, jnp.asarray(loud), slots)
    quiet = rng.standard_normal((1, 2, K, H)).astype(np.float32) * 0.01
    pages, scales = write(pages, scales, LAYER, jnp.asarray(quiet), slots[:, :2])
    check_sequence(pages, scales, "int8", np.array([5], np.int32), quiet[0])


def test_growing_pages_beyond_the_cap_clip_and_stay_finite():
    """A single row touching three already-started pages (not a consecutive layout) may
    requantize only one (B = 1): the others keep their scale and clip, never NaN."""
    rng = np.random.default_rng(4)
    pages, scales = empty_cache("float8_e4m3fn", rng)
    small = rng.standard_normal((1, 3, K, H)).astype(np.float32) * 0.1
    slots = jnp.asarray([[2 * G, 7 * G, 12 * G]], jnp.int32)  # offset 0 of pages 2, 7, 12
    pages, scales = write(pages, scales, LAYER, jnp.asarray(small), slots)
    old_scales = np.asarray(scales)[LAYER]
    big = np.full((1, 3, K, H), 50.0, np.float32)
    pages, scales = write(pages, scales, LAYER, jnp.asarray(big), slots + 1)
    new_scales = np.asarray(scales)[LAYER]
    grew = new_scales[:, [2, 7, 12]] > old_scales[:, [2, 7, 12]]
    assert grew[:, 0].all() and not grew[:, 1:].any()
    deq = np.asarray(gather_pages(pages, LAYER, jnp.asarray([[2, 7, 12]]), scales))[0]
    assert np.isfinite(deq.reshape(3, G, K, H)[:, :2]).all()
    np.testing.assert_allclose(deq[G + 1], np.broadcast_to(448 * new_scales[:, 7, None], (K, H)),
                               rtol=1e-6)


def test_attention_over_a_quantized_cache_matches_float():
    """End to end through the reference: write a prompt quantized, attend, compare with the
    float cache (int8 error budget)."""
    rng = np.random.default_rng(5)
    s, n = 13, 4
    table = np.array([[8, 2, 19, 0]], np.int32)
    k = rng.standard_normal((1, s, K, H)).astype(np.float32)
    v = rng.standard_normal((1, s, K, H)).astype(np.float32)
    slots = jnp.asarray(slots_for(table[0], np.arange(s))[None])
    kq, ks = empty_cache("int8", rng)
    vq, vs = empty_cache("int8", rng)
    kq, ks = write(kq, ks, LAYER, jnp.asarray(k), slots)
    vq, vs = write(vq, vs, LAYER, jnp.asarray(v), slots)
    kf = jnp.zeros((L, K, P, G, H)).at[LAYER, :, slots[0] // G, slots[0] % G].set(k[0])
    vf = jnp.zeros((L, K, P, G, H)).at[LAYER, :, slots[0] // G, slots[0] % G].set(v[0])
    q = jnp.asarray(rng.standard_normal((1, 1, n, H)), jnp.float32)
    args = (jnp.asarray(table), jnp.array([s]), jnp.array([[s - 1]]))
    got = paged_attention_reference(q, kq, vq, LAYER, *args, k_scale=ks, v_scale=vs,
                                    scale=H ** -0.5)
    want = paged_attention_reference(q, kf, vf, LAYER, *args, scale=H ** -0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-2)


def test_rejects_float_pages():
    with pytest.raises(ValueError, match="int8 or float8"):
        write_pages_quantized(jnp.zeros((L, K, P, G, H)), jnp.zeros((L, K, P)), 0,
                              jnp.zeros((1, 1, K, H)), jnp.zeros((1, 1), jnp.int32))
