"""The device step functions: the engine API every host loop goes through (STYLE.md rule 9).

`prefill_step` and `decode_step` are pure jitted functions over `(params, cache, inputs)`; the
model graph is merged inside the trace (`nnx.merge`), and the cache is donated so XLA updates
pages in place. `Runner` owns one compiled executable per static bucket: it pads host inputs to
`buckets.py` sizes, places them with the mesh's shardings and counts compilations, so a
recompile after warm-up is visible (`Runner.num_compiles`).

`decode_step` runs several tokens per dispatch (`lax.scan`) and stops rows on device (EOS or
token budget), so the host syncs once per chunk instead of once per token and can dispatch the
next chunk before reading the previous one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import buckets, ops
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.kv_cache import PagedKVCache, cache_axes
from jaxinfer.sampling import SamplingParams, sample
from sharding.rules import named_sharding, tree_shardings

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
                 kernels: str, use_sampling: bool, unroll_layers: bool = False
                 ) -> tuple[PagedKVCache, jax.Array, jax.Array]:
    """Write a prompt chunk into the cache; return (cache, next tokens [B], logits [B, V])."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model(inputs.tokens, inputs.positions, cache, inputs.block_tables,
                          inputs.seq_lens, inputs.slots, kernels=kernels,
                          unroll_layers=unroll_layers)
    last = jnp.take_along_axis(hidden, inputs.logit_index[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = model.logits(last)
    tokens = sample(logits, inputs.sampling, inputs.keys, inputs.seq_lens, use_sampling=use_sampling)
    return cache, tokens, logits


def decode_step(graphdef, params, cache: PagedKVCache, state: DecodeState, *, kernels: str,
                use_sampling: bool, num_steps: int, eos_ids: tuple[int, ...],
                unroll_layers: bool = False) -> tuple[PagedKVCache, DecodeState, jax.Array]:
    """Generate `num_steps` tokens per row; returns tokens [num_steps, B] (-1 once a row stops)."""
    model = nnx.merge(graphdef, params)
    page_size = cache.page_size
    width = state.block_tables.shape[1]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), dtype=jnp.int32)

    def one(carry, _):
        cache, st = carry
        pos = st.seq_lens  # [B]
        page = jnp.take_along_axis(st.block_tables, jnp.minimum(pos // page_size, width - 1)[:, None],
                                   axis=1)[:, 0]
        slot = jnp.where(st.active & (pos < width * page_size), page * page_size + pos % page_size, -1)
        seq_lens = jnp.where(st.active, pos + 1, 0)
        hidden, cache = model(st.tokens[:, None], pos[:, None], cache, st.block_tables,
                              seq_lens, slot[:, None], kernels=kernels,
                              unroll_layers=unroll_layers)
        logits = model.logits(hidden[:, 0])
        nxt = sample(logits, st.sampling, st.keys, pos + 1, use_sampling=use_sampling)
        nxt = jnp.where(st.active, nxt, -1)
        remaining = st.remaining - st.active.astype(jnp.int32)
        active = st.active & (remaining > 0) & ~jnp.isin(nxt, eos)
        st = dataclasses.replace(st, tokens=jnp.where(st.active, nxt, st.tokens),
                                 seq_lens=jnp.where(st.active, pos + 1, pos),
                                 remaining=remaining, active=active)
        return (cache, st), nxt

    (cache, state), tokens = jax.lax.scan(one, (cache, state), None, length=num_steps)
    return cache, state, tokens


class Runner:
    """Compiled step functions for one model on one mesh, one executable per bucket."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, graphdef, params, *,
                 mesh: jax.sharding.Mesh) -> None:
        ops.check_kernels(engine_cfg.kernels)
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.graphdef = graphdef
        self.params = params
        self.mesh = mesh
        self.cache_shardings = tree_shardings(mesh, cache_axes())
        self._compiled: dict[tuple, Callable] = {}
        self.num_compiles = 0
        self.compile_seconds = 0.0

    # -- placement -------------------------------------------------------------------------
    def _put(self, x: np.ndarray, axes: tuple) -> jax.Array:
        return jax.device_put(np.asarray(x), named_sharding(self.mesh, axes))

    def _put_sampling(self, s: SamplingParams) -> SamplingParams:
        return jax.tree.map(lambda x: self._put(x, ("batch",)), s)

    # -- compilation -----------------------------------------------------------------------
    def _executable(self, key: tuple, fn, args) -> Callable:
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = jax.jit(fn, donate_argnums=(1,)).lower(*args).compile()
            dt = time.perf_counter() - t0
            self._compiled[key] = exe
            self.num_compiles += 1
            self.compile_seconds += dt
            logger.info("compiled %s in %.2fs", key, dt)
        return exe

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
        inputs = PrefillInputs(
            tokens=self._put(tok, ("batch", None)), positions=self._put(pos, ("batch", None)),
            slots=self._put(slots, ("batch", None)), block_tables=self._put(bts, ("batch", None)),
            seq_lens=self._put(lens, ("batch",)), logit_index=self._put(idx, ("batch",)),
            sampling=self._put_sampling(s), keys=self._put(kd, ("batch", None)))
        use_sampling = s.uses_sampling()
        fn = _partial(prefill_step, self.graphdef, kernels=eng.kernels, use_sampling=use_sampling,
                      unroll_layers=eng.unroll_layers)
        exe = self._executable(("prefill", b, t, w, use_sampling), fn,
                               (self.params, cache, inputs))
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
        bts = np.zeros((b, w), np.int32)
        for i, bt in enumerate(block_tables):
            bts[i, : len(bt)] = bt
        rem = np.zeros(b, np.int32)
        rem[:n] = remaining
        lens = np.zeros(b, np.int32)
        lens[:n] = seq_lens
        if isinstance(tokens, (np.ndarray, list)):
            tk = np.zeros(b, np.int32)
            tk[:n] = tokens
            tokens = self._put(tk, ("batch",))
        elif tokens.shape[0] != b:
            raise ValueError(f"device tokens have batch {tokens.shape[0]}, bucket is {b}")
        eos = np.asarray(self.model_cfg.eos_token_ids or (-1,), np.int32)
        active = self._put(rem > 0, ("batch",)) & ~jnp.isin(tokens, eos)
        return DecodeState(
            tokens=tokens, seq_lens=self._put(lens, ("batch",)), remaining=self._put(rem, ("batch",)),
            active=active, block_tables=self._put(bts, ("batch", None)),
            sampling=self._put_sampling(sampling.pad(b)),
            keys=self._put(np.concatenate([keys, np.zeros((b - n, 2), np.uint32)]), ("batch", None)))

    def decode(self, cache: PagedKVCache, state: DecodeState, *, num_steps: int | None = None,
               use_sampling: bool) -> tuple[PagedKVCache, DecodeState, jax.Array]:
        """Dispatch `num_steps` decode tokens (asynchronously); returns tokens [steps, B]."""
        eng = self.engine_cfg
        steps = num_steps or eng.decode_steps
        b, w = state.block_tables.shape
        fn = _partial(decode_step, self.graphdef, kernels=eng.kernels, use_sampling=use_sampling,
                      num_steps=steps, eos_ids=self.model_cfg.eos_token_ids,
                      unroll_layers=eng.unroll_layers)
        exe = self._executable(("decode", b, w, steps, use_sampling), fn,
                               (self.params, cache, state))
        return exe(self.params, cache, state)


def _partial(fn, graphdef, **static):
    def bound(params, cache, inputs):
        return fn(graphdef, params, cache, inputs, **static)
    bound.__name__ = fn.__name__
    return bound
