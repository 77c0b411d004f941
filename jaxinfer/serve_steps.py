"""The serving engine's device steps: persistent decode slots, one decode and one prefill program
per static shape, all compiled ahead of time (STYLE.md rules 7 and 9).

Companion of `jaxinfer/runner.py` (which serves offline generation): these are the only device
calls `serve/engine.py` makes. The host never needs a step's sampled tokens to dispatch the next
step, because each running sequence owns a *slot* whose state lives on device (`SlotState`):

- `serve_prefill_step` writes a chunk of prompt tokens [R, T] into the paged cache; for a row
  whose chunk ends the sequence's known tokens it samples the next token and stores it, with the
  row's sampling parameters and PRNG key, in the row's slot.
- a decode step is two programs dispatched back to back: `serve_decode_forward` feeds each
  row's slot token at the position the host gives and returns logits [B, V];
  `serve_decode_sample` samples and stores the new token back in the slot. Step n+1 reads what
  step n wrote, on device.

The host sends only small int32 arrays per step (slots, positions, block tables, chunk tokens,
sampling parameters packed as int32 bits), one transfer per call, and reads back one int32
array per call ([rows, 2 + 2k]: token, logprob bits, top-k ids, top-k logprob bits) with
`copy_to_host_async`. Row `num_slots` of the slot state is scratch: padding rows read and write
there and are otherwise ignored.

Why the sampler is its own program: the host knows whether any row of a decode batch samples,
has penalties or wants logprobs, and picks the greedy sampler (argmax) or the full one
(penalties, sorting sampler, logprobs) per step. A device-side `lax.cond` would do the same in
one program, but on GPU XLA reads a conditional's predicate back to the host, which blocks the
dispatching thread until the device gets there and so serialises host and device (measured:
6 ms of host time per step at batch 64). Prefill rows are few, so the prefill program always
runs the full sampler. Penalties need a [S+1, V] prompt-token mask and output-token counts per
slot, built from the chunks a sequence is fed (a penalized sequence is therefore prefilled
from position 0, with no prefix-cache hit) and updated with every token it samples.

Only meshes without manual axes (dp = pp = 1; tp sharded automatically) are supported here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import buckets, ops
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import PagedKVCache, cache_axes, init_cache
from jaxinfer.sampling import (SamplingParams, apply_penalties, greedy_tokens, sample,
                               token_logprobs, whole_rows)
from sharding.rules import model_rules, tree_shardings
from sharding.spmd import manual_axes, mesh_context, replicated

logger = logging.getLogger(__name__)

NUM_META = 5  # prefill row metadata: slot, start, length, sample flag, prompt length
NUM_INT = 4  # top_k, key word 0, key word 1, wants logprobs
NUM_FLOAT = 6  # temperature, top_p, min_p, repetition, presence, frequency penalty


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """What each decode slot keeps on device between steps (S slots + 1 scratch row)."""

    tokens: jax.Array  # [S+1] int32 last sampled token, not yet in the cache
    float_params: jax.Array  # [S+1, 6] float32, see NUM_FLOAT
    int_params: jax.Array  # [S+1, 4] int32, see NUM_INT
    prompt_mask: jax.Array  # [S+1, V] bool: token occurs in the prompt (penalized slots)
    output_counts: jax.Array  # [S+1, V] int32: times the token was sampled (penalized slots)


def _sampling_params(fp: jax.Array, ip: jax.Array) -> SamplingParams:
    return SamplingParams(temperature=fp[:, 0], top_k=ip[:, 0], top_p=fp[:, 1], min_p=fp[:, 2],
                          repetition_penalty=fp[:, 3], presence_penalty=fp[:, 4],
                          frequency_penalty=fp[:, 5])


def _penalized(fp: jax.Array) -> jax.Array:
    return (fp[:, 3] != 1) | (fp[:, 4] != 0) | (fp[:, 5] != 0)


def _choose(logits: jax.Array, state: SlotState, slot: jax.Array, fp: jax.Array, ip: jax.Array,
            positions: jax.Array, counted: jax.Array, *, full: bool, num_logprobs: int
            ) -> tuple[jax.Array, SlotState, jax.Array]:
    """Sample one token per row from logits [B, V] f32 for rows whose slots are `slot` [B];
    `counted` [B] marks rows whose token is a real output (penalty counts). Returns (tokens [B],
    state with counts updated, packed output [B, 2 + 2k] int32).

    `full` is static and chosen by the host per call: False is plain argmax (an all-greedy
    batch without penalties or logprobs pays nothing more); True runs penalties, sampling and
    logprobs for every row (neutral parameters leave a row's logits unchanged)."""
    b, k = logits.shape[0], num_logprobs
    bits = jax.lax.bitcast_convert_type
    if not full:
        tokens = greedy_tokens(logits)
        return tokens, state, jnp.concatenate(
            [tokens[:, None], jnp.zeros((b, 1 + 2 * k), jnp.int32)], axis=1)
    logits = whole_rows(logits)
    params = _sampling_params(fp, ip)
    pen = counted & _penalized(fp)
    scored = apply_penalties(logits, params, state.prompt_mask[slot], state.output_counts[slot])
    keys = bits(ip[:, 1:3], jnp.uint32)
    tokens = sample(scored, params, keys, positions, use_sampling=True)
    counts = state.output_counts.at[slot, tokens].add(pen.astype(jnp.int32), mode="drop")
    state = dataclasses.replace(state, output_counts=counts)
    chosen, ids, lps = token_logprobs(logits, tokens, k)
    out = jnp.concatenate([tokens[:, None], bits(chosen, jnp.int32)[:, None], ids,
                           bits(lps, jnp.int32)], axis=1)
    return tokens, state, out


def serve_decode_forward(graphdef, params, cache: PagedKVCache, last_tokens: jax.Array,
                         inputs: jax.Array, *, kernels: str, unroll_layers: int = 1
                         ) -> tuple[PagedKVCache, jax.Array]:
    """The model half of a decode step: one token for each of B rows.

    last_tokens [S+1] int32 is `SlotState.tokens`; inputs [B, 2 + W] int32: slot, position of
    the fed token (-1: padding row), block table. Returns (cache, logits [B, V] float32)."""
    model = nnx.merge(graphdef, params)
    g = cache.page_size
    slot, pos, bt = inputs[:, 0], inputs[:, 1], inputs[:, 2:]
    valid = pos >= 0
    pos = jnp.maximum(pos, 0)
    page = jnp.take_along_axis(bt, jnp.minimum(pos // g, bt.shape[1] - 1)[:, None], axis=1)[:, 0]
    write = jnp.where(valid, page * g + pos % g, -1)
    seq_lens = jnp.where(valid, pos + 1, 0)
    hidden, cache = model(last_tokens[slot][:, None], pos[:, None], cache, bt, seq_lens,
                          write[:, None], kernels=kernels, unroll_layers=unroll_layers)
    return cache, model.logits(hidden[:, 0], kernels=kernels)


def serve_decode_sample(state: SlotState, logits: jax.Array, inputs: jax.Array, *, full: bool,
                        num_logprobs: int) -> tuple[SlotState, jax.Array]:
    """The sampling half of a decode step (a separate, small program, so the host can pick the
    greedy or the full sampler per step without a device-side branch): logits [B, V] f32 and
    the decode inputs [B, 2 + W]. Stores each row's token in its slot; returns (state,
    out [B, 2 + 2k] int32)."""
    slot, pos = inputs[:, 0], inputs[:, 1]
    tokens, state, out = _choose(logits, state, slot, state.float_params[slot],
                                 state.int_params[slot], jnp.maximum(pos, 0) + 1, pos >= 0,
                                 full=full, num_logprobs=num_logprobs)
    return dataclasses.replace(state, tokens=state.tokens.at[slot].set(tokens)), out


def serve_prefill_step(graphdef, params, cache: PagedKVCache, state: SlotState,
                       inputs: jax.Array, *, chunk: int, width: int, kernels: str,
                       num_logprobs: int, unroll_layers: int = 1
                       ) -> tuple[PagedKVCache, SlotState, jax.Array]:
    """A chunk of up to T known tokens for each of R rows, sampled with the full sampler (R is
    small, so always paying for it is cheaper than a second program family).

    inputs [R, T + W + 15] int32: tokens [T] | block table [W] | slot, start, length (0: padding
    row), sample flag, prompt length | top_k, key [2], wants logprobs | 6 float32 parameters as
    int32 bits. Rows with the sample flag store their sampled token in their slot. Returns
    (cache, state, out [R, 2 + 2k] int32)."""
    model = nnx.merge(graphdef, params)
    g = cache.page_size
    scratch = state.tokens.shape[0] - 1
    vocab = state.prompt_mask.shape[1]
    tok, bt = inputs[:, :chunk], inputs[:, chunk: chunk + width]
    meta = inputs[:, chunk + width:]
    slot, start, length, sample_flag, prompt_len = (meta[:, i] for i in range(NUM_META))
    ip = meta[:, NUM_META: NUM_META + NUM_INT]
    fp = jax.lax.bitcast_convert_type(meta[:, NUM_META + NUM_INT:], jnp.float32)
    real = length > 0
    slot = jnp.where(real, slot, scratch)
    j = jnp.arange(chunk, dtype=jnp.int32)
    positions = start[:, None] + j[None, :]  # [R, T]
    in_chunk = j[None, :] < length[:, None]
    page = jnp.take_along_axis(bt, jnp.minimum(positions // g, width - 1), axis=1)
    write = jnp.where(in_chunk, page * g + positions % g, -1)
    seq_lens = jnp.where(real, start + length, 0)
    hidden, cache = model(tok, positions, cache, bt, seq_lens, write, kernels=kernels,
                          unroll_layers=unroll_layers)
    last = jnp.take_along_axis(hidden, jnp.maximum(length - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last, kernels=kernels)

    # The slot takes the row's sampling parameters; penalized rows track their prompt tokens
    # (mask) and already generated tokens (counts, when a preempted sequence is recomputed).
    pen = real & _penalized(fp)
    first = jnp.where(pen & (start == 0), slot, scratch + 1)  # out of range: dropped
    rows = jnp.broadcast_to(slot[:, None], tok.shape)
    use = in_chunk & pen[:, None]
    is_prompt = use & (positions < prompt_len[:, None])
    mask = state.prompt_mask.at[first].set(False, mode="drop")
    mask = mask.at[rows, jnp.where(is_prompt, tok, vocab)].set(True, mode="drop")
    counts = state.output_counts.at[first].set(0, mode="drop")
    counts = counts.at[rows, jnp.where(use & ~is_prompt, tok, vocab)].add(1, mode="drop")
    state = dataclasses.replace(state, float_params=state.float_params.at[slot].set(fp),
                                int_params=state.int_params.at[slot].set(ip),
                                prompt_mask=mask, output_counts=counts)
    sampled = real & (sample_flag > 0)
    tokens, state, out = _choose(logits, state, slot, fp, ip, start + length, sampled,
                                 full=True, num_logprobs=num_logprobs)
    keep = jnp.where(sampled, slot, scratch)
    state = dataclasses.replace(state, tokens=state.tokens.at[keep].set(tokens))
    return cache, state, out


def _local(out: jax.Array) -> jax.Array:
    """A step's replicated output as this process's own copy: under a mesh that spans several
    processes (multi-host serving) the global array cannot be read, its local replica can."""
    return out if out.is_fully_addressable else out.addressable_data(0)


class ServingRunner:
    """The serving steps compiled for one model on one mesh: `(B, W)` decode programs and
    `(R, T)` prefill programs from `jaxinfer.buckets`, compiled ahead of time and looked up by
    shape; a shape missing at run time is compiled on the spot and reported through
    `on_late_compile` (a recompile after warm-up is a bug)."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, graphdef, params, *,
                 mesh: jax.sharding.Mesh) -> None:
        ops.check_kernels(engine_cfg.kernels)
        if manual_axes(mesh):
            raise ConfigError(f"the serving engine runs on tp-only meshes for now; got mesh "
                              f"{dict(mesh.shape)} (dp and pp must be 1)")
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.graphdef = graphdef
        self.params = params
        self.mesh = mesh
        self.num_slots = buckets.serve_num_slots(engine_cfg)
        self.full_width = max(buckets.serve_page_widths(engine_cfg))
        self.num_logprobs = engine_cfg.max_logprobs
        self._rep = replicated(mesh)
        self.cache_shardings = tree_shardings(mesh, cache_axes(engine_cfg),
                                              model_rules(model_cfg, mesh))
        self._exes: dict[tuple, Callable] = {}
        self._lock = threading.Lock()
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.warm = False
        self.on_late_compile: Callable[[tuple, float], None] | None = None

    # -- state ---------------------------------------------------------------------------
    def init_cache(self) -> PagedKVCache:
        return init_cache(self.model_cfg, self.engine_cfg, self.cache_shardings)

    def init_state(self) -> SlotState:
        s, v = self.num_slots + 1, self.model_cfg.vocab_size

        def make():
            fp = jnp.zeros((s, NUM_FLOAT), jnp.float32).at[:, 1].set(1.0).at[:, 3].set(1.0)
            return SlotState(tokens=jnp.zeros((s,), jnp.int32), float_params=fp,
                             int_params=jnp.zeros((s, NUM_INT), jnp.int32),
                             prompt_mask=jnp.zeros((s, v), bool),
                             output_counts=jnp.zeros((s, v), jnp.int32))

        return jax.jit(make, out_shardings=self._rep)()

    # -- programs ------------------------------------------------------------------------
    def program_keys(self) -> list[tuple]:
        """("decode", B, W) model halves, ("sample", B, full) samplers, ("prefill", R, T)."""
        eng = self.engine_cfg
        return ([("decode", b, w) for b, w in buckets.serve_decode_shapes(eng)]
                + [("sample", b, full) for b in eng.serve_decode_buckets
                   for full in (False, True)]
                + [("prefill", r, t) for r, t in buckets.serve_prefill_shapes(eng)])

    def _program(self, key: tuple, cache: PagedKVCache, state: SlotState):
        """(function, abstract arguments, donated argument numbers, output shardings)."""
        eng = self.engine_cfg

        def spec(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        def ints(*shape):
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._rep)

        cache_spec, state_spec = jax.tree.map(spec, cache), jax.tree.map(spec, state)
        cache_out = jax.tree.map(lambda x: x.sharding, cache)
        state_out = jax.tree.map(lambda x: x.sharding, state)
        kind = key[0]
        if kind == "decode":
            _, b, w = key

            def fn(params, cache, last_tokens, inputs):
                cache, logits = serve_decode_forward(
                    self.graphdef, params, cache, last_tokens, inputs, kernels=eng.kernels,
                    unroll_layers=eng.layer_unroll)
                return cache, logits, inputs[:, :2]

            args = (self.params, cache_spec, state_spec.tokens, ints(b, 2 + w))
            return fn, args, (1,), (cache_out, self._rep, self._rep)
        if kind == "sample":
            _, b, full = key

            def fn(state, logits, meta):
                return serve_decode_sample(state, logits, meta, full=full,
                                           num_logprobs=self.num_logprobs)

            logits = jax.ShapeDtypeStruct((b, self.model_cfg.vocab_size), jnp.float32,
                                          sharding=self._rep)
            return fn, (state_spec, logits, ints(b, 2)), (0,), (state_out, self._rep)
        _, r, t = key
        w = self.full_width

        def fn(params, cache, state, inputs):
            return serve_prefill_step(self.graphdef, params, cache, state, inputs, chunk=t,
                                      width=w, kernels=eng.kernels,
                                      num_logprobs=self.num_logprobs,
                                      unroll_layers=eng.layer_unroll)

        args = (self.params, cache_spec, state_spec,
                ints(r, t + w + NUM_META + NUM_INT + NUM_FLOAT))
        return fn, args, (1, 2), (cache_out, state_out, self._rep)

    def compile(self, key: tuple, cache: PagedKVCache, state: SlotState) -> Callable:
        """Compile (or fetch) the program for `key`; thread-safe, so warm-up can use a pool."""
        with self._lock:
            exe = self._exes.get(key)
        if exe is not None:
            return exe
        fn, args, donate, out_shardings = self._program(key, cache, state)
        fn.__name__ = "serve_" + "_".join(map(str, key))
        t0 = time.perf_counter()
        with mesh_context(self.mesh):  # `constrain` inside the model sees the mesh
            exe = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings
                          ).lower(*args).compile()
        dt = time.perf_counter() - t0
        with self._lock:
            if key in self._exes:
                return self._exes[key]
            self._exes[key] = exe
            self.num_compiles += 1
            self.compile_seconds += dt
        logger.info("compiled %s in %.2fs", key, dt)
        if self.warm and self.on_late_compile is not None:
            self.on_late_compile(key, dt)
        return exe

    def compile_all(self, cache: PagedKVCache, state: SlotState, *, max_workers: int,
                    progress: Callable[[tuple, float], None] | None = None) -> None:
        """Compile every program; XLA compiles release the GIL, so a pool overlaps them."""
        keys = self.program_keys()
        with concurrent.futures.ThreadPoolExecutor(max(1, min(max_workers, len(keys)))) as pool:
            futures = {pool.submit(self.compile, k, cache, state): k for k in keys}
            for fut in concurrent.futures.as_completed(futures):
                fut.result()
                if progress is not None:
                    progress(futures[fut], 0.0)
        self.warm = True

    def _exe(self, key: tuple, cache: PagedKVCache, state: SlotState) -> Callable:
        exe = self._exes.get(key)
        return exe if exe is not None else self.compile(key, cache, state)

    # -- steps ---------------------------------------------------------------------------
    @staticmethod
    def host_input(x: np.ndarray) -> np.ndarray:
        """A step's packed int32 inputs, handed to the compiled program as a NumPy array: its
        C++ dispatch path transfers it with the compiled (replicated) input sharding. A Python
        `jax.device_put` first cost 0.47 ms per step on the H100 host (25 us vs 6 us on CPU)."""
        return np.ascontiguousarray(x, np.int32)

    def decode(self, cache: PagedKVCache, state: SlotState, *, slots: np.ndarray,
               positions: np.ndarray, block_tables: np.ndarray, full: bool
               ) -> tuple[PagedKVCache, SlotState, jax.Array]:
        """Dispatch a decode step (asynchronously): the model program, then the greedy or the
        full sampler. slots/positions [B], block_tables [B, W] at a compiled (B, W)."""
        b, w = block_tables.shape
        inputs = np.concatenate([slots[:, None], positions[:, None], block_tables], axis=1)
        fwd = self._exe(("decode", b, w), cache, state)
        cache, logits, meta = fwd(self.params, cache, state.tokens,
                                  self.host_input(inputs))
        state, out = self._exe(("sample", b, full), cache, state)(state, logits, meta)
        return cache, state, _local(out)

    def prefill(self, cache: PagedKVCache, state: SlotState, *, tokens: np.ndarray,
                block_tables: np.ndarray, slots: np.ndarray, starts: np.ndarray,
                lens: np.ndarray, sample: np.ndarray, prompt_lens: np.ndarray,
                int_params: np.ndarray, float_params: np.ndarray
                ) -> tuple[PagedKVCache, SlotState, jax.Array]:
        """Dispatch a prefill step (asynchronously). tokens [R, T] at a compiled (R, T);
        block_tables [R, W_full]; per-row vectors [R]; int_params [R, 4]; float_params [R, 6]."""
        r, t = tokens.shape
        meta = np.stack([slots, starts, lens, sample.astype(np.int32), prompt_lens], axis=1)
        inputs = np.concatenate(
            [tokens, block_tables, meta.astype(np.int32), int_params,
             np.ascontiguousarray(float_params, np.float32).view(np.int32)], axis=1)
        exe = self._exe(("prefill", r, t), cache, state)
        cache, state, out = exe(self.params, cache, state, self.host_input(inputs))
        return cache, state, _local(out)

    def close(self) -> None:
        """Release what the runner holds besides device arrays (nothing here; a multi-host
        leader's subclass tells its followers to stop)."""

    def run_padding(self, cache: PagedKVCache, state: SlotState
                    ) -> tuple[PagedKVCache, SlotState]:
        """Run every compiled program once on padding rows (no cache or slot is touched but
        the scratch row): first-run costs are paid before traffic arrives."""
        scratch = self.num_slots
        for key in self.program_keys():
            if key[0] == "sample":
                continue  # run with their decode programs
            if key[0] == "decode":
                _, b, w = key
                for full in (False, True):
                    cache, state, out = self.decode(
                        cache, state, slots=np.full(b, scratch, np.int32),
                        positions=np.full(b, -1, np.int32),
                        block_tables=np.zeros((b, w), np.int32), full=full)
            else:
                _, r, t = key
                z = np.zeros(r, np.int32)
                fp = np.zeros((r, NUM_FLOAT), np.float32)
                fp[:, [1, 3]] = 1.0
                cache, state, out = self.prefill(
                    cache, state, tokens=np.zeros((r, t), np.int32),
                    block_tables=np.zeros((r, self.full_width), np.int32),
                    slots=np.full(r, scratch, np.int32), starts=z, lens=z, sample=z,
                    prompt_lens=z, int_params=np.zeros((r, NUM_INT), np.int32),
                    float_params=fp)
            out.block_until_ready()
        return cache, state
