"""Paged cache: paged attention equals a contiguous reference, writes land in their pages only,
and quantized caches carry their scales. (Page ownership is `jaxinfer.engine.kv_pages.KVPages`,
tested in test_kv_pages.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import paged_attention_reference, write_pages


def _contiguous_attention(q, k, v, positions, scale):
    """Plain causal attention over contiguous k/v [B, S, K, H] (float64 numpy)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    out = np.zeros((b, t, n, h))
    for i in range(b):
        for j in range(t):
            p = positions[i, j]
            for head in range(n):
                kh = head // (n // kv)
                logits = k[i, : p + 1, kh] @ q[i, j, head] * scale
                w = np.exp(logits - logits.max())
                out[i, j, head] = (w / w.sum()) @ v[i, : p + 1, kh]
    return out


@pytest.mark.parametrize("page_size,n_heads,kv_heads,t", [(4, 4, 2, 1), (8, 8, 1, 3), (2, 2, 2, 5)])
def test_paged_equals_contiguous(page_size, n_heads, kv_heads, t):
    rng = np.random.default_rng(page_size * 10 + t)
    b, h, layers, pages = 3, 8, 2, 32
    lens = np.array([7, 1, 13])  # total tokens per sequence, not page multiples
    width = -(-lens.max() // page_size)
    perm = rng.permutation(pages)  # scattered, non-contiguous pages
    block_tables = perm[: b * width].reshape(b, width).astype(np.int32)
    k = rng.standard_normal((b, lens.max(), kv_heads, h)).astype(np.float32)
    v = rng.standard_normal((b, lens.max(), kv_heads, h)).astype(np.float32)
    kp = jnp.full((layers, kv_heads, pages, page_size, h), np.nan, jnp.float32)  # poisoned
    vp = jnp.full_like(kp, np.nan)
    pos = np.arange(lens.max())[None].repeat(b, 0)
    slots = block_tables[np.arange(b)[:, None], pos // page_size] * page_size + pos % page_size
    slots = np.where(pos < lens[:, None], slots, -1).astype(np.int32)
    kp = write_pages(kp, 1, jnp.asarray(k), jnp.asarray(slots))
    vp = write_pages(vp, 1, jnp.asarray(v), jnp.asarray(slots))
    # pages never written stay NaN: attention must not read them into the result
    kp = jnp.nan_to_num(kp, nan=0.0)
    vp = jnp.nan_to_num(vp, nan=0.0)
    q = rng.standard_normal((b, t, n_heads, h)).astype(np.float32)
    qpos = np.maximum(lens[:, None] - t + np.arange(t)[None], 0).astype(np.int32)
    out = paged_attention_reference(jnp.asarray(q), kp, vp, 1, jnp.asarray(block_tables),
                                    jnp.asarray(lens, jnp.int32), jnp.asarray(qpos),
                                    scale=h ** -0.5)
    want = _contiguous_attention(q, k, v, qpos, h ** -0.5)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


def test_write_pages_drops_padding_and_touches_only_its_layer():
    kp = jnp.zeros((2, 1, 4, 2, 1))
    new = jnp.arange(1, 5, dtype=jnp.float32).reshape(1, 4, 1, 1)
    slots = jnp.array([[3, -1, 100, 0]])
    out = np.asarray(write_pages(kp, 0, new, slots))
    assert out[1].sum() == 0
    assert out[0, 0, 1, 1, 0] == 1 and out[0, 0, 0, 0, 0] == 4
    assert out.sum() == 5


def test_sliding_window_masks_old_keys():
    h = 4
    kp = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 4, 4, h)), jnp.float32)
    # value of the key at position s is s in every dim
    vp = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32).reshape(1, 1, 4, 4, 1), (1, 1, 4, 4, h))
    q = jnp.zeros((1, 1, 1, h))  # uniform attention: output = mean of visible values
    bt = jnp.array([[0, 1, 2, 3]], jnp.int32)
    out = paged_attention_reference(q, kp, vp, 0, bt, jnp.array([10]), jnp.array([[9]]),
                                    scale=1.0, sliding_window=3)
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], np.full(h, (7 + 8 + 9) / 3), rtol=1e-6)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_quantized_cache_has_per_page_per_head_scales(kv_dtype):
    """An int8/fp8 cache carries float32 k_scale/v_scale [L, K, P] in its abstract shape, its
    logical axes and the real (sharded) zero cache; a float cache carries none."""
    from jaxinfer.config import EngineConfig, preset
    from jaxinfer.kv_cache import abstract_cache, cache_axes, init_cache
    from sharding.rules import tree_shardings

    model = preset("dummy")
    engine = EngineConfig(page_size=8, num_pages=16, max_seq_len=64, cache_dtype=kv_dtype)
    want = (model.num_layers, model.num_kv_heads, 16)
    abstract = abstract_cache(model, engine)
    assert abstract.k.dtype == jnp.dtype(kv_dtype)
    assert abstract.k.shape == (*want, 8, model.head_dim)
    assert abstract.k_scale.shape == abstract.v_scale.shape == want
    assert abstract.k_scale.dtype == jnp.float32
    axes = cache_axes(engine)
    assert axes.k_scale == axes.v_scale == ("layers", "kv_heads", "pages")
    mesh = jax.make_mesh((1,), ("tp",), devices=jax.devices()[:1])
    cache = init_cache(model, engine, tree_shardings(mesh, axes))
    assert jax.tree.structure(cache) == jax.tree.structure(abstract)
    for got, spec in zip(jax.tree.leaves(cache), jax.tree.leaves(abstract)):
        assert got.shape == spec.shape and got.dtype == spec.dtype
        assert not np.asarray(got.astype(jnp.float32)).any()
    float_engine = EngineConfig(page_size=8, num_pages=16, max_seq_len=64)
    plain = init_cache(model, float_engine)
    assert plain.k_scale is None and cache_axes(float_engine).k_scale is None
    with pytest.raises(ValueError, match="scale shardings"):
        init_cache(model, engine, tree_shardings(mesh, cache_axes()))


def test_pool_stays_within_the_kernels_int32_offsets(monkeypatch):
    """On a device with room for more, the pool stops where one layer's and head's pages reach
    2**31 bytes (the GPU kernels' int32 offsets; an H200 answered wrong tokens past it), for
    each cache dtype; an explicit num_pages past it is a clear error."""
    from jaxinfer import kv_cache
    from jaxinfer.config import EngineConfig, preset
    from jaxinfer.engine.core import resolve_engine_config
    from jaxinfer.errors import ConfigError

    model = preset("dummy")
    one = jax.make_mesh((1,), ("tp",), devices=jax.devices()[:1])
    for cache_dtype, item in ((None, jnp.dtype(EngineConfig().dtype).itemsize), ("int8", 1),
                              ("float32", 4)):
        engine = EngineConfig(page_size=16, max_seq_len=64, cache_dtype=cache_dtype)
        per_page = 16 * model.head_dim * item
        cap = kv_cache.max_pages(model, engine)
        assert cap * per_page < 2**31 <= (cap + 1) * per_page
        monkeypatch.setattr(kv_cache, "memory_stats", lambda d: {"bytes_limit": 2**50})
        assert kv_cache.size_pool(model, engine, one) == cap
    monkeypatch.setattr(kv_cache, "memory_stats", lambda d: {"bytes_limit": 2**30})
    assert kv_cache.size_pool(model, engine, one) < cap
    with pytest.raises(ConfigError, match="2\\*\\*31 bytes"):
        resolve_engine_config(model, EngineConfig(page_size=16, max_seq_len=64,
                                                  num_pages=cap + 1, cache_dtype="float32"), one)
    assert resolve_engine_config(model, EngineConfig(page_size=16, max_seq_len=64,
                                                     num_pages=cap, cache_dtype="float32"),
                                 one).num_pages == cap
