"""The device step functions: the engine API every host loop goes through (STYLE.md rule 9).

`prefill_step` and `decode_step` are pure jitted functions over `(params, cache, inputs)`; the
model graph is merged inside the trace (`nnx.merge`), and the cache is donated so XLA updates
pages in place. `Runner` owns one compiled executable per static bucket: it pads host inputs to
`buckets.py` sizes, places them with the mesh's shardings and counts compilations, so a
recompile after warm-up is visible (`Runner.num_compiles`).

`decode_step` runs several tokens per dispatch (`lax.scan`) and stops rows on device (EOS or
token budget), so the host syncs once per chunk instead of once per token and can dispatch the
next chunk before reading the previous one.

Parallelism: tensor parallelism needs nothing here (the parameters' shardings carry it and
GSPMD partitions the step). With dp or pp > 1 the same steps run per (replica, stage) block in a
`shard_map` (`_prefill_local`, `_decode_local`): each replica makes its page ids local, and with
pp > 1 the layers run as a pipeline (`_prefill_pipelined`: GPipe; `_decode_pipelined`: a cyclic
multi-step schedule), both from `sharding/pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import buckets, ops
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.kv_cache import PagedKVCache, cache_axes
from jaxinfer.sampling import SamplingParams, sample
from sharding import pipeline
from sharding.data_parallel import ReplicaLayout, to_local_pages
from sharding.mesh import MeshSpec, check_engine_fits, check_model_fits
from sharding.rules import model_rules, named_sharding, tree_shardings
from sharding.spmd import (batch_spec, batch_specs, manual_axes, mesh_context, replicated,
                           shard_map, specs_of)

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillInputs:
    """A chunk of T new tokens for each of B sequences (T, B, W bucketed)."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32
    slots: jax.Array  # [B, T] int32 flat cache slot, -1 for padding
    block_tables: jax.Array  # [B, W] int32
    seq_lens: jax.Array  # [B] int32 cached tokens after this chunk
    logit_index: jax.Array  # [B] int32 index in T of the token whose logits are returned
    sampling: SamplingParams
    keys: jax.Array  # [B, 2] uint32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What decode carries from one token to the next, all on device."""

    tokens: jax.Array  # [B] int32 last sampled token, not yet in the cache
    seq_lens: jax.Array  # [B] int32 tokens in the cache
    remaining: jax.Array  # [B] int32 tokens the row may still generate
    active: jax.Array  # [B] bool
    block_tables: jax.Array  # [B, W] int32
    sampling: SamplingParams
    keys: jax.Array  # [B, 2] uint32


def prefill_step(graphdef, params, cache: PagedKVCache, inputs: PrefillInputs, *,
                 kernels: str, use_sampling: bool, unroll_layers: int = 1
                 ) -> tuple[PagedKVCache, jax.Array, jax.Array]:
    """Write a prompt chunk into the cache; return (cache, next tokens [B], logits [B, V])."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model(inputs.tokens, inputs.positions, cache, inputs.block_tables,
                          inputs.seq_lens, inputs.slots, kernels=kernels,
                          unroll_layers=unroll_layers)
    last = jnp.take_along_axis(hidden, inputs.logit_index[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = model.logits(last, kernels=kernels)
    tokens = sample(logits, inputs.sampling, inputs.keys, inputs.seq_lens, use_sampling=use_sampling)
    return cache, tokens, logits


def _decode_inputs(st: DecodeState, page_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(positions [B], cache slots [B], attention lengths [B]) of the token each row feeds."""
    width = st.block_tables.shape[1]
    pos = st.seq_lens
    page = jnp.take_along_axis(st.block_tables, jnp.minimum(pos // page_size, width - 1)[:, None],
                               axis=1)[:, 0]
    slot = jnp.where(st.active & (pos < width * page_size), page * page_size + pos % page_size, -1)
    return pos, slot, jnp.where(st.active, pos + 1, 0)


def _advance(st: DecodeState, logits: jax.Array, eos: jax.Array, use_sampling: bool
             ) -> tuple[DecodeState, jax.Array]:
    """Sample each row's next token from logits [B, V] and step the state; -1 for rows that
    had already stopped."""
    pos = st.seq_lens
    nxt = sample(logits, st.sampling, st.keys, pos + 1, use_sampling=use_sampling)
    nxt = jnp.where(st.active, nxt, -1)
    remaining = st.remaining - st.active.astype(jnp.int32)
    active = st.active & (remaining > 0) & ~jnp.isin(nxt, eos)
    st = dataclasses.replace(st, tokens=jnp.where(st.active, nxt, st.tokens),
                             seq_lens=jnp.where(st.active, pos + 1, pos),
                             remaining=remaining, active=active)
    return st, nxt


def _eos_array(eos_ids: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(eos_ids if eos_ids else (-1,), dtype=jnp.int32)


def decode_step(graphdef, params, cache: PagedKVCache, state: DecodeState, *, kernels: str,
                use_sampling: bool, num_steps: int, eos_ids: tuple[int, ...],
                unroll_layers: int = 1) -> tuple[PagedKVCache, DecodeState, jax.Array]:
    """Generate `num_steps` tokens per row; returns tokens [num_steps, B] (-1 once a row stops)."""
    model = nnx.merge(graphdef, params)
    eos = _eos_array(eos_ids)

    def one(carry, _):
        cache, st = carry
        pos, slot, seq_lens = _decode_inputs(st, cache.page_size)
        hidden, cache = model(st.tokens[:, None], pos[:, None], cache, st.block_tables,
                              seq_lens, slot[:, None], kernels=kernels,
                              unroll_layers=unroll_layers)
        logits = model.logits(hidden[:, 0], kernels=kernels)
        st, nxt = _advance(st, logits, eos, use_sampling)
        return (cache, st), nxt

    (cache, state), tokens = jax.lax.scan(one, (cache, state), None, length=num_steps)
    return cache, state, tokens


# -- Pipeline and data parallel step bodies ---------------------------------------------------
# These run inside `sharding.spmd.shard_map` with dp and pp manual (`Runner._prefill_fn`):
# arrays are one replica's rows and one stage's layers; tp stays automatic. Page ids arrive
# global and are made replica-local here; the schedules live in `sharding/pipeline.py`.


def _rows(a: jax.Array, m: jax.Array, size: int) -> jax.Array:
    """Rows [m * size, (m + 1) * size) of a batch-major array: micro-batch m."""
    return jax.lax.dynamic_slice_in_dim(a, m * size, size, axis=0)


def _prefill_pipelined(model, cache: PagedKVCache, inputs: PrefillInputs, *, kernels: str,
                       unroll_layers: int, num_stages: int) -> tuple[PagedKVCache, jax.Array]:
    """GPipe over the prompt chunk; returns (cache, final-normed hidden [B, D] at logit_index)."""
    b, t = inputs.tokens.shape
    m_count = pipeline.num_microbatches(b, num_stages)
    mb = b // m_count
    x = model.embed_tokens(inputs.tokens)
    xs = x.reshape(m_count, mb, t, x.shape[-1])  # [M, mb, T, D]

    def stage_fn(x, cache, m, valid):
        slots = jnp.where(valid, _rows(inputs.slots, m, mb), -1)  # no writes in the bubble
        return model.run_layers(x, _rows(inputs.positions, m, mb), cache,
                                _rows(inputs.block_tables, m, mb), _rows(inputs.seq_lens, m, mb),
                                slots, kernels=kernels, unroll_layers=unroll_layers)

    def collect(x, m):
        idx = _rows(inputs.logit_index, m, mb)
        return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]  # [mb, D]

    last, cache = pipeline.gpipe(stage_fn, collect, xs, cache, num_stages=num_stages)
    return cache, model.norm(last.reshape(b, -1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Packet:
    """What one decode micro-batch carries from stage to stage (two ppermutes per hand-off)."""

    x: jax.Array  # [mb, 1, D] activations
    meta: jax.Array  # [mb, 3] int32: position, cache slot (-1: no write), attention length


_MOVING = ("tokens", "seq_lens", "remaining", "active")  # the DecodeState fields decode changes


def _decode_pipelined(model, cache: PagedKVCache, state: DecodeState, *, kernels: str,
                      use_sampling: bool, num_steps: int, eos_ids: tuple[int, ...],
                      unroll_layers: int, num_stages: int
                      ) -> tuple[PagedKVCache, DecodeState, jax.Array]:
    """`decode_step` on the cyclic pipeline of `sharding.pipeline.pipelined_decode`."""
    b = state.tokens.shape[0]
    m_count = pipeline.num_microbatches(b, num_stages)
    mb = b // m_count
    eos = _eos_array(eos_ids)
    # Only the fields decode changes travel through the tick loop and the final broadcast.
    fixed = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
             if f.name not in _MOVING}

    def rows_of(moving, m) -> DecodeState:  # micro-batch m's rows of the full state
        return jax.tree.map(lambda a: _rows(a, m, mb), DecodeState(**moving, **fixed))

    def inject(carry, m):
        st = rows_of(carry[0], m)
        pos, slot, seq_lens = _decode_inputs(st, cache.page_size)
        return _Packet(x=model.embed_tokens(st.tokens[:, None]),
                       meta=jnp.stack([pos, slot, seq_lens], axis=1))

    def stage_fn(pkt, cache, m, valid):
        pos, slot, seq_lens = pkt.meta[:, 0], pkt.meta[:, 1], pkt.meta[:, 2]
        slot = jnp.where(valid, slot, -1)  # no writes in the bubble
        x, cache = model.run_layers(pkt.x, pos[:, None], cache,
                                    _rows(state.block_tables, m, mb), seq_lens, slot[:, None],
                                    kernels=kernels, unroll_layers=unroll_layers)
        return dataclasses.replace(pkt, x=x), cache

    def finish(carry, pkt, m, k, done):
        moving, out = carry
        sub = rows_of(moving, m)
        logits = model.logits(model.norm(pkt.x[:, 0]), kernels=kernels)
        new, nxt = _advance(sub, logits, eos, use_sampling)
        moving = {name: jax.lax.dynamic_update_slice_in_dim(
            moving[name], jnp.where(done, getattr(new, name), getattr(sub, name)), m * mb, 0)
            for name in _MOVING}
        old = jax.lax.dynamic_slice(out, (k, m * mb), (1, mb))
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, nxt[None], old), (k, m * mb))
        return moving, out

    moving = {name: getattr(state, name) for name in _MOVING}
    out0 = jnp.full((num_steps, b), -1, jnp.int32)
    (moving, tokens), cache = pipeline.pipelined_decode(
        inject=inject, stage_fn=stage_fn, finish=finish, state=(moving, out0), carry=cache,
        num_steps=num_steps, num_microbatches=m_count, num_stages=num_stages)
    return cache, DecodeState(**moving, **fixed), tokens


def _prefill_local(graphdef, params, cache: PagedKVCache, inputs: PrefillInputs, *, kernels: str,
                   use_sampling: bool, unroll_layers: int, num_stages: int,
                   pages_per_replica: int) -> tuple[PagedKVCache, jax.Array, jax.Array]:
    """prefill_step on one (dp replica, pp stage) block."""
    bt, slots = to_local_pages(inputs.block_tables, inputs.slots,
                               pages_per_replica=pages_per_replica, page_size=cache.page_size)
    inputs = dataclasses.replace(inputs, block_tables=bt, slots=slots)
    if num_stages == 1:
        return prefill_step(graphdef, params, cache, inputs, kernels=kernels,
                            use_sampling=use_sampling, unroll_layers=unroll_layers)
    model = nnx.merge(graphdef, params)
    cache, last = _prefill_pipelined(model, cache, inputs, kernels=kernels,
                                     unroll_layers=unroll_layers, num_stages=num_stages)
    logits = model.logits(last, kernels=kernels)
    tokens = sample(logits, inputs.sampling, inputs.keys, inputs.seq_lens,
                    use_sampling=use_sampling)
    return cache, tokens, logits


def _decode_local(graphdef, params, cache: PagedKVCache, state: DecodeState, *, kernels: str,
                  use_sampling: bool, num_steps: int, eos_ids: tuple[int, ...],
                  unroll_layers: int, num_stages: int, pages_per_replica: int
                  ) -> tuple[PagedKVCache, DecodeState, jax.Array]:
    """decode_step on one (dp replica, pp stage) block; the state keeps global page ids."""
    global_bt = state.block_tables
    local_bt, _ = to_local_pages(global_bt, None, pages_per_replica=pages_per_replica,
                                 page_size=cache.page_size)
    state = dataclasses.replace(state, block_tables=local_bt)
    static = dict(kernels=kernels, use_sampling=use_sampling, num_steps=num_steps,
                  eos_ids=eos_ids, unroll_layers=unroll_layers)
    if num_stages == 1:
        cache, state, tokens = decode_step(graphdef, params, cache, state, **static)
    else:
        cache, state, tokens = _decode_pipelined(nnx.merge(graphdef, params), cache, state,
                                                 num_stages=num_stages, **static)
    return cache, dataclasses.replace(state, block_tables=global_bt), tokens


class Runner:
    """Compiled step functions for one model on one mesh, one executable per bucket.

    On a mesh with dp or pp > 1 each step runs under `sharding.spmd.shard_map` (dp, pp manual;
    tp automatic): `_prefill_local`/`_decode_local` above, with `sharding.pipeline` schedules
    when pp > 1. With dp > 1 the public API stays in slot order while the device runs rows
    replica-major (`sharding.data_parallel`): host inputs are permuted on the way in, tokens and
    logits are gathered back to slot order inside the step, and a `DecodeState` is kept in
    device order (treat it as opaque). Slot i must use pages of replica `layout.replica_of_slot
    (i)`; `layout.check_block_tables` enforces it. Tokens and logits come back replicated on
    every device, so every process of a multi-host run can read them.
    """

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, graphdef, params, *,
                 mesh: jax.sharding.Mesh) -> None:
        ops.check_kernels(engine_cfg.kernels)
        self.spec = MeshSpec.of(mesh)
        check_model_fits(self.spec, model_cfg)
        check_engine_fits(self.spec, engine_cfg)
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.graphdef = graphdef
        self.params = params
        self.mesh = mesh
        self.layout = ReplicaLayout(self.spec.dp, engine_cfg.num_pages)
        self.cache_shardings = tree_shardings(mesh, cache_axes(engine_cfg),
                                              model_rules(model_cfg, mesh))
        self._manual = manual_axes(mesh)
        self._param_specs = specs_of(params, self._manual)
        self._replicated = replicated(mesh)
        self._multiprocess = jax.process_count() > 1
        self._compiled: dict[tuple, Callable] = {}
        self.num_compiles = 0
        self.compile_seconds = 0.0

    @property
    def compiled(self) -> types.MappingProxyType:
        """Read-only view of the compiled executables by bucket key, e.g. ("decode", B, W,
        steps, use_sampling); `.as_text()` gives the HLO a test can inspect."""
        return types.MappingProxyType(self._compiled)

    # -- placement -------------------------------------------------------------------------
    def _put(self, x: np.ndarray, axes: tuple) -> jax.Array:
        x = np.asarray(x)
        sharding = named_sharding(self.mesh, axes, shape=x.shape)
        if not self._multiprocess:
            return jax.device_put(x, sharding)
        # Every process holds the same host array; each places only its own devices' blocks.
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def _put_sampling(self, s: SamplingParams) -> SamplingParams:
        return jax.tree.map(lambda x: self._put(x, ("batch",)), s)

    def _batch_sharding(self, ndim: int) -> jax.sharding.NamedSharding:
        return named_sharding(self.mesh, ("batch",) + (None,) * (ndim - 1))

    def _device_rows(self, b: int) -> np.ndarray | None:
        """Slot of each device row (None when the order is the identity, dp == 1)."""
        return self.layout.device_rows(b) if self.spec.dp > 1 else None

    def _slot_rows(self, b: int) -> np.ndarray | None:
        """Device row of each slot (None when the order is the identity, dp == 1)."""
        return self.layout.slot_rows(b) if self.spec.dp > 1 else None

    # -- compilation -----------------------------------------------------------------------
    def _executable(self, key: tuple, fn, args, *, out_shardings=None,
                    donate: tuple[int, ...] = (1,)) -> Callable:
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            kw = {} if out_shardings is None else {"out_shardings": out_shardings}
            with mesh_context(self.mesh):  # `constrain` inside the model sees the mesh
                exe = jax.jit(fn, donate_argnums=donate, **kw).lower(*args).compile()
            dt = time.perf_counter() - t0
            self._compiled[key] = exe
            self.num_compiles += 1
            self.compile_seconds += dt
            logger.info("compiled %s in %.2fs", key, dt)
        return exe

    def _prefill_fn(self, cache: PagedKVCache, inputs: PrefillInputs, use_sampling: bool):
        eng = self.engine_cfg
        static = dict(kernels=eng.kernels, use_sampling=use_sampling,
                      unroll_layers=eng.layer_unroll)
        if not self._manual:
            return _partial(prefill_step, self.graphdef, **static)
        body = _partial(_prefill_local, self.graphdef, num_stages=self.spec.pp,
                        pages_per_replica=self.layout.pages_per_replica, **static)
        cache_specs = specs_of(cache, self._manual)
        step = shard_map(body, self.mesh,
                         in_specs=(self._param_specs, cache_specs, batch_specs(inputs)),
                         out_specs=(cache_specs, batch_spec(), batch_spec()),
                         manual=self._manual)
        slot_rows = self._slot_rows(inputs.tokens.shape[0])

        def fn(params, cache, inputs):
            cache, tokens, logits = step(params, cache, inputs)
            if slot_rows is not None:  # device order -> slot order
                tokens, logits = tokens[slot_rows], logits[slot_rows]
            return cache, tokens, logits

        return fn

    def _decode_fn(self, cache: PagedKVCache, state: DecodeState, steps: int,
                   use_sampling: bool):
        eng = self.engine_cfg
        static = dict(kernels=eng.kernels, use_sampling=use_sampling, num_steps=steps,
                      eos_ids=self.model_cfg.eos_token_ids, unroll_layers=eng.layer_unroll)
        if not self._manual:
            return _partial(decode_step, self.graphdef, **static)
        body = _partial(_decode_local, self.graphdef, num_stages=self.spec.pp,
                        pages_per_replica=self.layout.pages_per_replica, **static)
        cache_specs = specs_of(cache, self._manual)
        state_specs = batch_specs(state)
        step = shard_map(body, self.mesh,
                         in_specs=(self._param_specs, cache_specs, state_specs),
                         out_specs=(cache_specs, state_specs, batch_spec(axis=1)),
                         manual=self._manual)
        slot_rows = self._slot_rows(state.tokens.shape[0])

        def fn(params, cache, state):
            cache, state, tokens = step(params, cache, state)
            if slot_rows is not None:
                tokens = tokens[:, slot_rows]
            return cache, state, tokens

        return fn

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, cache: PagedKVCache, *, tokens: list[np.ndarray], start: list[int],
                block_tables: list[list[int]], sampling: SamplingParams, keys: np.ndarray,
                width: int | None = None) -> tuple[PagedKVCache, jax.Array, jax.Array]:
        """Prefill one chunk per row: row i's `tokens[i]` sit at positions start[i].. and are
        written through its block table. Rows with no tokens are padding. Returns (cache,
        next tokens [B'], logits [B', V]) at bucketed B'; rows past len(tokens) are padding."""
        eng = self.engine_cfg
        n = len(tokens)
        b = buckets.batch_bucket(eng, n)
        t = buckets.prefill_bucket(eng, max(len(x) for x in tokens))
        w = width or buckets.page_bucket(eng, max(len(bt) for bt in block_tables))
        g = eng.page_size
        self.layout.check_block_tables(block_tables)
        tok = np.zeros((b, t), np.int32)
        pos = np.zeros((b, t), np.int32)
        slots = np.full((b, t), -1, np.int32)
        bts = np.zeros((b, w), np.int32)
        lens = np.zeros(b, np.int32)
        idx = np.zeros(b, np.int32)
        for i in range(n):
            m = len(tokens[i])
            bts[i, : len(block_tables[i])] = block_tables[i]
            lens[i] = start[i] + m
            if m == 0:
                continue
            p = start[i] + np.arange(m)
            tok[i, :m] = tokens[i]
            pos[i, :m] = p
            slots[i, :m] = bts[i, p // g] * g + p % g
            idx[i] = m - 1
        s = sampling.pad(b)
        kd = np.concatenate([keys, np.zeros((b - n, 2), np.uint32)])
        rows = self._device_rows(b)
        if rows is not None:  # slot order -> device order (replica-major)
            tok, pos, slots, bts, lens, idx, kd = (a[rows] for a in
                                                   (tok, pos, slots, bts, lens, idx, kd))
            s = jax.tree.map(lambda a: np.asarray(a)[rows], s)
        inputs = PrefillInputs(
            tokens=self._put(tok, ("batch", None)), positions=self._put(pos, ("batch", None)),
            slots=self._put(slots, ("batch", None)), block_tables=self._put(bts, ("batch", None)),
            seq_lens=self._put(lens, ("batch",)), logit_index=self._put(idx, ("batch",)),
            sampling=self._put_sampling(s), keys=self._put(kd, ("batch", None)))
        use_sampling = s.uses_sampling()
        key = ("prefill", b, t, w, use_sampling)
        fn = None if key in self._compiled else self._prefill_fn(cache, inputs, use_sampling)
        exe = self._executable(key, fn, (self.params, cache, inputs),
                               out_shardings=(_shardings_of(cache), self._replicated,
                                              self._replicated))
        return exe(self.params, cache, inputs)

    # -- decode ----------------------------------------------------------------------------
    def decode_state(self, *, tokens: jax.Array | np.ndarray, seq_lens: np.ndarray,
                     remaining: np.ndarray, block_tables: list[list[int]],
                     sampling: SamplingParams, keys: np.ndarray, width: int | None = None
                     ) -> DecodeState:
        """Build a device DecodeState for n rows padded to the batch bucket. `tokens` may be the
        device array prefill returned (already padded) or host ids."""
        eng = self.engine_cfg
        n = len(seq_lens)
        b = buckets.batch_bucket(eng, n)
        w = width or buckets.page_bucket(eng, max(len(bt) for bt in block_tables))
        self.layout.check_block_tables(block_tables)
        bts = np.zeros((b, w), np.int32)
        for i, bt in enumerate(block_tables):
            bts[i, : len(bt)] = bt
        rem = np.zeros(b, np.int32)
        rem[:n] = remaining
        lens = np.zeros(b, np.int32)
        lens[:n] = seq_lens
        kd = np.concatenate([keys, np.zeros((b - n, 2), np.uint32)])
        s = sampling.pad(b)
        rows = self._device_rows(b)
        if rows is not None:  # slot order -> device order (replica-major)
            bts, rem, lens, kd = bts[rows], rem[rows], lens[rows], kd[rows]
            s = jax.tree.map(lambda a: np.asarray(a)[rows], s)
        if isinstance(tokens, (np.ndarray, list)):
            tk = np.zeros(b, np.int32)
            tk[:n] = tokens
            tokens = self._put(tk if rows is None else tk[rows], ("batch",))
        elif tokens.shape[0] != b:
            raise ValueError(f"device tokens have batch {tokens.shape[0]}, bucket is {b}")
        elif rows is not None:
            reorder = self._executable(("reorder", b), lambda t: t[rows], (tokens,),
                                       out_shardings=self._batch_sharding(1), donate=())
            tokens = reorder(tokens)
        eos = np.asarray(self.model_cfg.eos_token_ids or (-1,), np.int32)
        active = self._put(rem > 0, ("batch",)) & ~jnp.isin(tokens, eos)
        return DecodeState(
            tokens=tokens, seq_lens=self._put(lens, ("batch",)), remaining=self._put(rem, ("batch",)),
            active=active, block_tables=self._put(bts, ("batch", None)),
            sampling=self._put_sampling(s), keys=self._put(kd, ("batch", None)))

    def decode(self, cache: PagedKVCache, state: DecodeState, *, num_steps: int | None = None,
               use_sampling: bool) -> tuple[PagedKVCache, DecodeState, jax.Array]:
        """Dispatch `num_steps` decode tokens (asynchronously); returns tokens [steps, B] in
        slot order."""
        eng = self.engine_cfg
        steps = num_steps or eng.decode_steps
        b, w = state.block_tables.shape
        key = ("decode", b, w, steps, use_sampling)
        fn = None if key in self._compiled else self._decode_fn(cache, state, steps, use_sampling)
        state_shardings = jax.tree.map(lambda a: self._batch_sharding(a.ndim), state)
        exe = self._executable(key, fn, (self.params, cache, state),
                               out_shardings=(_shardings_of(cache), state_shardings,
                                              self._replicated))
        return exe(self.params, cache, state)


def _shardings_of(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def _partial(fn, graphdef, **static):
    def bound(params, cache, inputs):
        return fn(graphdef, params, cache, inputs, **static)
    bound.__name__ = fn.__name__
    return bound
