"""Pipeline parallelism: layers in `pp` stages, micro-batches flowing through them.

Layout. The stacked layer weights `[L, ...]` and the KV cache `[L, K, P, G, H]` are sharded
over `pp` on their `layers` axis, so stage s holds layers `[s * L/pp, (s + 1) * L/pp)` and
their cache; nothing of a stage's layers ever leaves its devices. Only activations move: one
`ppermute` of `[micro-batch, T, D]` per stage hand-off.

The step functions run inside a `shard_map` whose manual axis is `pp` (`tp` stays an automatic
GSPMD axis inside), so the code below sees its stage's layers and moves data between stages
explicitly. Every stage runs the same program (SPMD); at a tick
where a stage has no micro-batch (the bubble) it computes on garbage and the caller's
`stage_fn` must drop its cache writes (the runner sets the slots to -1).

Two schedules:

`gpipe` (prefill). The batch splits into M micro-batches; at tick t stage s runs micro-batch
t - s. After M + pp - 1 ticks the last stage holds every micro-batch's output, which is then
broadcast to all stages (a masked psum) so the LM head and sampling run everywhere.

    tick:      0    1    2    3    4          (pp = 3, M = 3)
    stage 0:  m0   m1   m2    .    .
    stage 1:   .   m0   m1   m2    .
    stage 2:   .    .   m0   m1   m2

`pipelined_decode` (multi-step decode). Decoding step k + 1 of a micro-batch needs the token
sampled at step k, so running GPipe once per step would drain the pipeline every token. Instead
the last stage's output is broadcast to every stage at the tick it is made; every stage turns
it into the next token (LM head + sampling, `finish`, the same on each, so the decode state
stays replicated and needs no broadcast at the end) and stage 0 feeds it straight back in
(`inject`). With R = max(M, pp), micro-batch m enters stage 0 for step k at tick k*R + m, so
once the pipeline is full every stage works on some micro-batch at every tick; the whole call
takes (num_steps - 1) * R + M + pp - 1 ticks instead of num_steps * (M + pp - 1).

    tick:      0    1    2    3    4    5    6   (pp = 2, M = 2, 3 steps)
    stage 0:  m0   m1   m0'  m1'  m0"  m1"   .   (' = next step, fed once m0 is finished)
    stage 1:   .   m0   m1   m0'  m1'  m0"  m1"

In the memory-bound decode regime a stage reads its weights once per tick, whatever the
micro-batch size, so M = pp (the default) gives the best throughput: fewer, larger micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PP_AXIS = "pp"


def num_microbatches(batch: int, num_stages: int) -> int:
    """Micro-batches for a local batch of `batch` rows: the largest divisor of `batch` that is
    at most `num_stages` (enough to fill the pipeline, as large as possible)."""
    for m in range(min(batch, num_stages), 0, -1):
        if batch % m == 0:
            return m
    return 1


def broadcast_from(tree: Any, src: int | jax.Array, *, axis: str = PP_AXIS) -> Any:
    """Every stage gets stage `src`'s value of each leaf (a masked psum over `axis`; floats in
    float32, which is exact here and sidesteps XLA CPU's abort on a bfloat16 psum inside a
    shard_map)."""
    s = jax.lax.axis_index(axis)

    def one(a):
        if a.dtype == jnp.bool_:
            return jax.lax.psum(jnp.where(s == src, a, False).astype(jnp.int32), axis) > 0
        if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != jnp.float32:
            wide = jnp.where(s == src, a, jnp.zeros_like(a)).astype(jnp.float32)
            return jax.lax.psum(wide, axis).astype(a.dtype)
        return jax.lax.psum(jnp.where(s == src, a, jnp.zeros_like(a)), axis)

    return jax.tree.map(one, tree)


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _index(tree: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def gpipe(
    stage_fn: Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, Any]],
    collect_fn: Callable[[Any, jax.Array], Any],
    inputs: Any,
    carry: Any,
    *,
    num_stages: int,
    axis: str = PP_AXIS,
) -> tuple[Any, Any]:
    """One forward pass of M micro-batches through `num_stages` stages (inside shard_map).

    Args:
      stage_fn: `(x, carry, m, valid) -> (x, carry)`: this stage's layers on micro-batch m
        (int32 scalar). `valid` is False in the bubble: the result is discarded and the
        function must leave `carry` (the cache) unchanged in effect.
      collect_fn: `(x, m) -> y`: what the last stage keeps of micro-batch m's output (e.g. the
        hidden state at the positions whose logits are wanted).
      inputs: pytree of `[M, ...]` arrays, stage 0's input for each micro-batch (every stage
        holds them; only stage 0 reads them).
      carry: state threaded through every tick (the stage's KV cache).
      num_stages: size of `axis`.

    Returns:
      (ys, carry): ys is `[M, ...]` of `collect_fn` outputs, the same on every stage.
    """
    leaves = jax.tree.leaves(inputs)
    m_count = leaves[0].shape[0]
    s = jax.lax.axis_index(axis)
    x0 = _index(inputs, jnp.int32(0))
    y_aval = jax.eval_shape(collect_fn, x0, jnp.int32(0))
    ys0 = jax.tree.map(lambda a: jnp.zeros((m_count,) + a.shape, a.dtype), y_aval)
    forward = [(i, i + 1) for i in range(num_stages - 1)]

    def tick(c, t):
        buf, carry, ys = c
        m = t - s
        valid = (m >= 0) & (m < m_count)
        mc = jnp.clip(m, 0, m_count - 1)
        x = _select(s == 0, _index(inputs, mc), buf)
        x, carry = stage_fn(x, carry, mc, valid)
        keep = valid & (s == num_stages - 1)
        y = _select(keep, collect_fn(x, mc), _index(ys, mc))
        ys = jax.tree.map(lambda acc, v: jax.lax.dynamic_update_index_in_dim(acc, v, mc, 0), ys, y)
        buf = jax.lax.ppermute(x, axis, forward)
        return (buf, carry, ys), None

    buf0 = jax.tree.map(jnp.zeros_like, x0)
    ticks = jnp.arange(m_count + num_stages - 1, dtype=jnp.int32)
    (_, carry, ys), _ = jax.lax.scan(tick, (buf0, carry, ys0), ticks)
    return broadcast_from(ys, num_stages - 1, axis=axis), carry


def pipelined_decode(
    *,
    inject: Callable[[Any, jax.Array], Any],
    stage_fn: Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, Any]],
    finish: Callable[[Any, Any, jax.Array, jax.Array, jax.Array], Any],
    state: Any,
    carry: Any,
    num_steps: int,
    num_microbatches: int,
    num_stages: int,
    axis: str = PP_AXIS,
) -> tuple[Any, Any]:
    """`num_steps` autoregressive steps of M micro-batches on a pipeline whose last stage's
    output goes to every stage (inside shard_map; the schedule is drawn in the module
    docstring).

    Args:
      inject: `(state, m) -> packet`: stage 0's input for micro-batch m's next step, built from
        the decode state (embedded last token, positions, cache slots, lengths).
      stage_fn: `(packet, carry, m, valid) -> (packet, carry)`: this stage's layers; with
        `valid` False (bubble, or a finished schedule) cache writes must be dropped.
      finish: `(state, packet, m, k, valid) -> state`: turns the last stage's output for
        micro-batch m's step k into the next token and updates the state, only where `valid`;
        called at every tick on every stage with the same arguments.
      state: the decode state, replicated over the stages (and kept so).
      carry: the stage's KV cache.

    Returns:
      (state, carry): the final state (the same on every stage); the stage's cache.
    """
    m_count, n_st = num_microbatches, num_stages
    period = max(m_count, n_st)
    s = jax.lax.axis_index(axis)
    forward = [(i, i + 1) for i in range(n_st - 1)]
    packet0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(inject, state, jnp.int32(0)))

    def tick(c, t):
        state, carry, recv = c
        u = t - s
        m, k = u % period, u // period
        valid = (u >= 0) & (m < m_count) & (k < num_steps)
        mc = jnp.clip(m, 0, m_count - 1)
        pkt = _select(s == 0, inject(state, mc), recv)
        pkt, carry = stage_fn(pkt, carry, mc, valid)
        # The last stage's output of this tick (one micro-batch's [mb, 1, D]), on every stage.
        last = broadcast_from(pkt, n_st - 1, axis=axis)
        u_l = t - (n_st - 1)
        m_l, k_l = u_l % period, u_l // period
        done = (u_l >= 0) & (m_l < m_count) & (k_l < num_steps)
        state = finish(state, last, jnp.clip(m_l, 0, m_count - 1),
                       jnp.clip(k_l, 0, num_steps - 1), done)
        recv = jax.lax.ppermute(pkt, axis, forward)
        return (state, carry, recv), None

    ticks = jnp.arange((num_steps - 1) * period + m_count + n_st - 1, dtype=jnp.int32)
    (state, carry, _), _ = jax.lax.scan(tick, (state, carry, packet0), ticks)
    return state, carry
