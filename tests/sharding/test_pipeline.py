"""The pipeline schedules on toy stage functions whose result is known in closed form, so a
wrong micro-batch order, a leaked bubble write or a lost hand-off changes the numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharding import pipeline
from sharding.mesh import make_mesh
from sharding.spmd import mesh_context, shard_map


def test_num_microbatches():
    assert [pipeline.num_microbatches(b, 2) for b in (1, 2, 3, 4, 64)] == [1, 2, 1, 2, 2]
    assert [pipeline.num_microbatches(b, 4) for b in (1, 2, 6, 8)] == [1, 2, 3, 4]


def _run(fn, mesh, *args):
    with mesh_context(mesh):
        return jax.jit(fn)(*args)


@pytest.mark.parametrize("pp,batch", [(2, 4), (4, 4), (4, 2), (2, 1)])
def test_gpipe_equals_sequential_stages(pp, batch):
    """Stage s maps x -> x * (s + 2) + 1; the carry counts, per stage, the rows each stage
    really processed (bubble ticks must not count)."""
    mesh = make_mesh(f"pp={pp}")
    x = jnp.arange(batch * 3, dtype=jnp.float32).reshape(batch, 3) + 1

    def body(x):
        s = jax.lax.axis_index("pp")
        m_count = pipeline.num_microbatches(x.shape[0], pp)
        xs = x.reshape(m_count, -1, 3)

        def stage_fn(x, seen, m, valid):
            return x * (s + 2).astype(x.dtype) + 1, seen + jnp.where(valid, x.shape[0], 0)

        def collect(x, m):
            return x.sum(axis=1)

        ys, seen = pipeline.gpipe(stage_fn, collect, xs, jnp.int32(0), num_stages=pp)
        return ys.reshape(-1), seen[None]

    fn = shard_map(body, mesh, in_specs=(jax.sharding.PartitionSpec(),),
                   out_specs=(jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("pp")),
                   manual=("dp", "pp"))
    ys, seen = _run(fn, mesh, x)
    want = np.asarray(x)
    for s in range(pp):
        want = want * (s + 2) + 1
    np.testing.assert_allclose(np.asarray(ys), want.sum(axis=1))
    assert np.asarray(seen).tolist() == [batch] * pp  # every stage saw each row exactly once


@pytest.mark.parametrize("pp,batch,steps", [(2, 4, 3), (4, 4, 2), (2, 6, 2), (4, 2, 3)])
def test_pipelined_decode_equals_step_by_step(pp, batch, steps):
    """A toy autoregressive model: stage s adds 10**s, stage 0 turns the result into the next
    token (mod 97). The cyclic schedule must give the same tokens as a plain loop."""
    mesh = make_mesh(f"pp={pp}")
    tokens0 = jnp.arange(batch, dtype=jnp.int32) * 7 + 3
    bump = sum(10 ** s for s in range(pp))

    def reference():
        tok, out = np.asarray(tokens0), []
        for _ in range(steps):
            tok = (tok * 3 + bump) % 97
            out.append(tok)
        return np.stack(out)

    def body(tokens):
        s = jax.lax.axis_index("pp")
        m_count = pipeline.num_microbatches(tokens.shape[0], pp)
        mb = tokens.shape[0] // m_count
        rows = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=mb, axis=0)

        def inject(state, m):
            return rows(state[0], m * mb) * 3

        def stage_fn(x, writes, m, valid):
            return x + 10 ** s, writes + valid.astype(jnp.int32)

        def finish(state, x, m, k, done):
            tok, out = state
            new = jnp.where(done, x % 97, rows(tok, m * mb))
            tok = jax.lax.dynamic_update_slice_in_dim(tok, new, m * mb, 0)
            old = jax.lax.dynamic_slice(out, (k, m * mb), (1, mb))
            out = jax.lax.dynamic_update_slice(out, jnp.where(done, new[None], old), (k, m * mb))
            return tok, out

        out0 = jnp.zeros((steps, tokens.shape[0]), jnp.int32)
        (_, out), writes = pipeline.pipelined_decode(
            inject=inject, stage_fn=stage_fn, finish=finish, state=(tokens, out0),
            carry=jnp.int32(0), num_steps=steps, num_microbatches=m_count, num_stages=pp)
        return out, writes[None]

    fn = shard_map(body, mesh, in_specs=(jax.sharding.PartitionSpec(),),
                   out_specs=(jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec("pp")),
                   manual=("dp", "pp"))
    out, writes = _run(fn, mesh, tokens0)
    np.testing.assert_array_equal(np.asarray(out), reference())
    m_count = pipeline.num_microbatches(batch, pp)
    # Each stage ran exactly steps * M valid micro-batch ticks: no bubble tick counted.
    assert np.asarray(writes).tolist() == [steps * m_count] * pp
