"""The Pallas attention kernels run per tp shard (`jaxinfer.ops.paged_attention` under a tp
mesh, `sharding.spmd.over_tp`): each shard attends with its query heads over its KV heads and
the result equals the unsharded reference. Decode (T = 1) and flash prefill (T = 16), float
and int8 caches; interpret mode on 8 fake CPU devices."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer import ops
from pallas_kernels import flash_attention, paged_decode_attention
from pallas_kernels.paged_attention import paged_attention_reference
from sharding.mesh import make_mesh
from sharding.spmd import mesh_context

L, K, N, H, G, PAGES, W = 2, 4, 8, 16, 8, 24, 4  # 2 query heads per KV head
SEQ_LENS = (29, 1, 0, 17)


def pool(rng, dtype):
    shape = (L, K, PAGES, G, H)
    if dtype == "int8":
        pages = [jnp.asarray(rng.integers(-127, 128, shape), jnp.int8) for _ in range(2)]
        scales = [jnp.asarray(rng.uniform(0.005, 0.02, (L, K, PAGES)), jnp.float32)
                  for _ in range(2)]
        return pages, scales
    return [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)], [None, None]


@pytest.mark.parametrize("t,kernel", [(1, "paged_decode_attention"),
                                      (16, "flash_prefill_attention")])
@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_kernel_per_tp_shard_equals_reference(t, kernel, cache_dtype, tp, monkeypatch):
    rng = np.random.default_rng(t + tp)
    (k_pages, v_pages), (k_scale, v_scale) = pool(rng, cache_dtype)
    b = len(SEQ_LENS)
    q = jnp.asarray(rng.normal(size=(b, t, N, H)), jnp.float32)
    tables = jnp.asarray(rng.permutation(PAGES)[:b * W].reshape(b, W), jnp.int32)
    seq_lens = jnp.asarray(SEQ_LENS, jnp.int32)
    positions = jnp.maximum(seq_lens[:, None] - t + jnp.arange(t)[None, :], 0)
    layer = jnp.int32(1)
    kw = dict(k_scale=k_scale, v_scale=v_scale, scale=H ** -0.5, sliding_window=None)
    want = paged_attention_reference(q, k_pages, v_pages, layer, tables, seq_lens, positions,
                                      **kw)

    module = paged_decode_attention if t == 1 else flash_attention
    seen = []
    real = getattr(module, kernel)

    def spy(q, k_pages, *args, **kwargs):
        seen.append((q.shape, k_pages.shape))
        return real(q, k_pages, *args, **kwargs)

    monkeypatch.setattr(module, kernel, spy)
    mesh = make_mesh(f"tp={tp}", devices=jax.devices()[:tp])

    def put(x, spec):
        return None if x is None else jax.device_put(x, NamedSharding(mesh, spec))

    heads, pages, scales = P(None, None, "tp", None), P(None, "tp"), P(None, "tp")
    args = (put(q, heads), put(k_pages, pages), put(v_pages, pages), layer, tables, seq_lens,
            positions)

    def attend(q, k_pages, v_pages, layer, tables, seq_lens, positions, k_scale, v_scale):
        return ops.paged_attention(q, k_pages, v_pages, layer, tables, seq_lens, positions,
                                   k_scale=k_scale, v_scale=v_scale, scale=H ** -0.5,
                                   sliding_window=None, kernels="pallas")

    with mesh_context(mesh):
        got = jax.jit(attend)(*args, put(k_scale, scales), put(v_scale, scales))
    assert seen == [((b, t, N // tp, H), (L, K // tp, PAGES, G, H))]
    assert got.sharding.spec[2] == "tp"  # the output stays split by heads, as q came in
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)


def test_replicated_kv_heads_use_the_reference(monkeypatch):
    """tp=8 over 4 KV heads: the cache is replicated, the kernel does not run per shard."""
    monkeypatch.setattr(paged_decode_attention, "paged_decode_attention",
                        lambda *a, **k: pytest.fail("kernel ran over replicated KV heads"))
    rng = np.random.default_rng(0)
    (k_pages, v_pages), _ = pool(rng, "float32")
    q = jnp.asarray(rng.normal(size=(1, 1, N, H)), jnp.float32)
    mesh = make_mesh("tp=8")
    tables = jnp.arange(W, dtype=jnp.int32)[None]
    with mesh_context(mesh):
        got = jax.jit(lambda q: ops.paged_attention(
            q, k_pages, v_pages, 0, tables, jnp.array([5]), jnp.array([[4]]), scale=0.25,
            sliding_window=None, kernels="pallas"))(q)
    want = paged_attention_reference(q, k_pages, v_pages, 0, tables, jnp.array([5]),
                                     jnp.array([[4]]), scale=0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_stacked_linear_reads_the_layer_per_tp_shard(tp, monkeypatch):
    """Float weight stacks at decode: `dense_matmul` reads layer `layer` in place on each tp
    shard; column-parallel (q, output heads split) and row-parallel (o, contracted heads
    split, partial sums reduced) equal x @ w[layer]. KV heads that tp does not divide (the
    cache replicates them) take XLA's dot instead."""
    from pallas_kernels import qmatmul

    seen = []
    real = qmatmul.dense_matmul

    def spy(x, w, **kw):
        seen.append((x.shape, w.shape))
        return real(x, w, **kw)

    monkeypatch.setattr(qmatmul, "dense_matmul", spy)
    rng = np.random.default_rng(tp)
    d, kv, b = 32, 2, 3
    x = jnp.asarray(rng.normal(size=(b, 1, d)), jnp.float32)
    attn = jnp.asarray(rng.normal(size=(b, 1, N, H)), jnp.float32)
    wq = jnp.asarray(rng.normal(size=(3, d, N, H)) * 0.1, jnp.float32)
    wk = jnp.asarray(rng.normal(size=(3, d, kv, H)) * 0.1, jnp.float32)
    wo = jnp.asarray(rng.normal(size=(3, N, H, d)) * 0.1, jnp.float32)
    mesh = make_mesh(f"tp={tp}", devices=jax.devices()[:tp])
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    q_axes, k_axes, o_axes = (("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim"),
                              ("heads", "head_dim", "embed"))

    def step(x, attn, wq, wk, wo, layer):
        kw = dict(layer=layer, kernels="pallas")
        return (ops.linear(x, wq, axes=q_axes, **kw), ops.linear(x, wk, axes=k_axes, **kw),
                ops.linear(attn, wo, contract=2, axes=o_axes, **kw))

    kv_split = kv % tp == 0
    args = (put(x, P()), put(attn, P(None, None, "tp")), put(wq, P(None, None, "tp")),
            put(wk, P(None, None, "tp" if kv_split else None)), put(wo, P(None, "tp")))
    with mesh_context(mesh):
        q, k, o = jax.jit(step)(*args, jnp.int32(1))
    np.testing.assert_allclose(np.asarray(q), np.tensordot(x, wq[1], 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(k), np.tensordot(x, wk[1], 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(o), np.tensordot(attn, wo[1], 2), atol=1e-5)
    want = [((b, d), (3, d, N * H // tp))]  # q: this shard's output columns
    if kv_split:
        want.append(((b, d), (3, d, kv * H // tp)))
    want.append(((b, N * H // tp), (3, N * H // tp, d)))  # o: this shard's contracted rows
    assert seen == want


def test_row_parallel_bfloat16_reduces_in_float32():
    """bfloat16 weights on CPU: the row-parallel partial sums are reduced in float32, so the
    result is the float32 product rounded once (a bfloat16 psum inside the shard_map aborts
    XLA's CPU compiler: "Invalid binary instruction opcode copy"; on GPU they are reduced in
    bfloat16, `test_tp_reduce_dtype`)."""
    rng = np.random.default_rng(7)
    d = 64
    attn = jnp.asarray(rng.normal(size=(2, 1, N, H)), jnp.bfloat16)
    wo = jnp.asarray(rng.normal(size=(3, N, H, d)) * 0.1, jnp.bfloat16)
    mesh = make_mesh("tp=2", devices=jax.devices()[:2])
    args = (jax.device_put(attn, NamedSharding(mesh, P(None, None, "tp"))),
            jax.device_put(wo, NamedSharding(mesh, P(None, "tp"))))
    with mesh_context(mesh):
        got = jax.jit(lambda a, w: ops.linear(
            a, w, contract=2, layer=jnp.int32(2), kernels="pallas",
            axes=("heads", "head_dim", "embed")))(*args)
    assert got.dtype == jnp.bfloat16
    want = np.tensordot(np.asarray(attn, np.float32), np.asarray(wo[2], np.float32), 2)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("tp,vocab", [(2, 64), (4, 64), (4, 66)])
def test_vocab_parallel_embedding(tp, vocab):
    """The embedding lookup from a vocab-split table: each tp shard looks up its own rows and
    one [B, T, D] all-reduce sums them, equal to the whole table's rows; the table never moves
    (GSPMD's own partitioning of the gather all-gathered the whole table per decode token on
    GPU). A vocabulary tp does not divide stays replicated and is a plain local gather."""
    rng = np.random.default_rng(tp + vocab)
    d = 16
    table = jnp.asarray(rng.normal(size=(vocab, d)), jnp.bfloat16)
    tokens = jnp.asarray([[0, vocab - 1, 17], [vocab // 2, 3, vocab // 2 - 1]], jnp.int32)
    mesh = make_mesh(f"tp={tp}", devices=jax.devices()[:tp])
    split = vocab % tp == 0
    placed = jax.device_put(table, NamedSharding(mesh, P("tp" if split else None)))
    with mesh_context(mesh):
        fn = jax.jit(ops.embedding)
        got = fn(placed, tokens)
        hlo = fn.lower(placed, tokens).compile().as_text()
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(table, np.float32)[np.asarray(tokens)])
    assert got.dtype == jnp.bfloat16
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    reduces = [line for line in hlo.splitlines() if " all-reduce(" in line
               or " all-reduce-start(" in line]
    if split:
        assert len(reduces) == 1 and f"f32[2,3,{d}]" in reduces[0], reduces
    else:
        assert not reduces, reduces


def test_tp_reduce_dtype(monkeypatch):
    """tp all-reduces: float32 where kernels are interpreted (CPU), the activations' dtype on
    GPU (measured faster there), and `EngineConfig.tp_reduce_dtype` wins when set: it reaches
    the runner's step options and the row-parallel psum's dtype in the lowered program."""
    assert ops.tp_reduce_dtype(jnp.bfloat16) == jnp.float32
    assert ops.tp_reduce_dtype(jnp.float32, "bfloat16") == jnp.bfloat16
    monkeypatch.setattr(ops, "use_interpret", lambda: False)
    assert ops.tp_reduce_dtype(jnp.bfloat16) == jnp.bfloat16
    assert ops.tp_reduce_dtype(jnp.float32) == jnp.float32
    assert ops.tp_reduce_dtype(jnp.bfloat16, "float32") == jnp.float32
    monkeypatch.undo()

    mesh = make_mesh("tp=2", devices=jax.devices()[:2])
    attn = jax.device_put(jnp.ones((2, 1, N, H), jnp.float32),
                          NamedSharding(mesh, P(None, None, "tp")))
    wo = jax.device_put(jnp.ones((3, N, H, 64), jnp.float32), NamedSharding(mesh, P(None, "tp")))

    def lowered(reduce_dtype):  # StableHLO only: a bfloat16 psum would abort XLA CPU's compiler
        fn = jax.jit(lambda a, w: ops.linear(a, w, contract=2, layer=jnp.int32(0),
                                             kernels="pallas", axes=("heads", "head_dim", "embed"),
                                             reduce_dtype=reduce_dtype))
        with mesh_context(mesh):
            text = fn.lower(attn, wo).as_text()
        return re.findall(r'"stablehlo.all_reduce".*?-> tensor<[\dx]*x(\w+)>', text, re.S)

    assert lowered(None) == ["f32"] and lowered("bfloat16") == ["bf16"]

    from jaxinfer.config import EngineConfig
    from jaxinfer.engine.llm import LLM
    from jaxinfer.model_loader import load_model

    loaded = load_model("dummy", mesh=mesh, dtype="float32")
    engine = EngineConfig(page_size=4, num_pages=8, max_seq_len=32, batch_buckets=(1,),
                          prefill_buckets=(8,), prefill_rows=(1,), tp_reduce_dtype="bfloat16")
    assert LLM.from_loaded(loaded, engine, mesh=mesh).core.runner.opts.reduce_dtype == "bfloat16"
