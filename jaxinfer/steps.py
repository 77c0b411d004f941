"""The device steps: pure functions over (params, cache, slot state, packed inputs).

These are the whole device side of the engine (STYLE.md rule 9): `jaxinfer/runner.py` jits
them once per bucket, offline generation, the bench and the server all run them.

Slots. Each running sequence owns a slot of `SlotState`: its last sampled token (not yet in the
cache), how many tokens it has in the cache, how many it may still sample, whether it is still
active, its sampling parameters and PRNG key, its stop ids and its penalty state. The host never
needs a step's tokens to dispatch the next one: a decode row only names its slot. Row
`num_slots` is scratch: padding rows read and write there, and it is never active.

- `prefill_step` writes a chunk of known tokens [R, T] into the paged cache; a row whose chunk
  ends the sequence's known tokens samples the next token (the full sampler: prefill rows are
  few) and (re)starts its slot.
- `decode_step` runs `num_steps` tokens for each of B slots in one dispatch (`lax.scan`), each
  row stopping on device at EOS (unless ignore_eos), a stop id, or when it may sample no more;
  a stopped row writes nothing and returns -1. `full` picks the sampler statically: argmax for
  all-greedy batches, else penalties, temperature/top-k/top-p/min-p and logprobs.
- `verify_step` feeds T known tokens per row and returns the logits of every position (the
  speculative-decoding verifier and the tests' scoring use it); it leaves the slots alone.

Inputs and outputs are packed by `jaxinfer.engine.packing` (one int32 array each way).

Pipeline parallelism (pp > 1): the runner calls these inside a `shard_map` with `pp` manual
(tp stays automatic); the layers run as a pipeline (`sharding.pipeline`: GPipe for prefill and
verify, the broadcast-output schedule for multi-step decode) and every stage keeps the same slot
state, since every stage samples from the same broadcast logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.engine import packing as pk
from jaxinfer.kv_cache import PagedKVCache, write_slots
from jaxinfer.sampling import (SamplingParams, apply_penalties, greedy_tokens, sample,
                               token_logprobs, whole_rows)
from sharding import pipeline


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """What each decode slot keeps on device between steps (S slots + 1 scratch row)."""

    tokens: jax.Array  # [S+1] int32 last sampled token, not yet in the cache
    seq_lens: jax.Array  # [S+1] int32 tokens in the cache (the next token's position)
    remaining: jax.Array  # [S+1] int32 tokens the slot may still sample
    active: jax.Array  # [S+1] bool: the slot samples in decode steps
    floats: jax.Array  # [S+1, NUM_FLOAT] float32 sampling parameters (packing.FLOAT_FIELDS)
    ints: jax.Array  # [S+1, NUM_INT] int32 (packing.INT_FIELDS)
    stop_ids: jax.Array  # [S+1, max_stop_token_ids] int32, -1 = none
    prompt_mask: jax.Array  # [S+1, V] bool: token occurs in the prompt (penalized slots)
    output_counts: jax.Array  # [S+1, V] int32: times the token was sampled (penalized slots)
    # [S+1, H] int32: the slot's tokens by position, its last sampled one included, kept when a
    # proposer reads them (speculative decoding; H = max_seq_len), else H = 1 and unused.
    history: jax.Array

    @property
    def keeps_history(self) -> bool:
        return self.history.shape[1] > 1


def init_slot_state(num_slots: int, vocab: int, num_stop: int, history: int = 1) -> SlotState:
    """A state with every slot inactive (call under jit with the state's sharding)."""
    s = num_slots + 1
    floats = jnp.tile(jnp.asarray(pk.NEUTRAL_FLOATS, jnp.float32), (s, 1))
    return SlotState(tokens=jnp.zeros((s,), jnp.int32), seq_lens=jnp.zeros((s,), jnp.int32),
                     remaining=jnp.zeros((s,), jnp.int32), active=jnp.zeros((s,), bool),
                     floats=floats, ints=jnp.zeros((s, pk.NUM_INT), jnp.int32),
                     stop_ids=jnp.full((s, num_stop), -1, jnp.int32),
                     prompt_mask=jnp.zeros((s, vocab), bool),
                     output_counts=jnp.zeros((s, vocab), jnp.int32),
                     history=jnp.zeros((s, history), jnp.int32))


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The static choices every program of one runner shares."""

    kernels: str  # "reference" | "pallas" (resolved)
    unroll_layers: int
    reduce_dtype: str | None  # tp all-reduce dtype override
    eos_ids: tuple[int, ...]
    num_logprobs: int  # top logprobs of the full sampler's output rows
    num_stages: int = 1  # pp


# -- the model, whole or as a pipeline ---------------------------------------------------------


def _model_kw(opts: StepOptions) -> dict:
    return dict(kernels=opts.kernels, unroll_layers=opts.unroll_layers,
                reduce_dtype=opts.reduce_dtype)


def _rows(a: jax.Array, m: jax.Array, size: int) -> jax.Array:
    """Rows [m * size, (m + 1) * size) of a batch-major array: micro-batch m."""
    return jax.lax.dynamic_slice_in_dim(a, m * size, size, axis=0)


def _forward(model, opts: StepOptions, cache: PagedKVCache, tokens, positions, block_tables,
             seq_lens, writes, collect) -> tuple[jax.Array, PagedKVCache]:
    """The model on tokens [B, T]; returns (final-normed `collect(hidden, rows)` for every row,
    cache). `collect(x [b, T, D], rows)` picks what the caller needs of each row's hidden
    states, `rows` being the row indices of x. With pp > 1 the layers run as GPipe over
    micro-batches (inside the runner's shard_map); the result is the same on every stage."""
    b = tokens.shape[0]
    if opts.num_stages == 1:
        hidden, cache = model(tokens, positions, cache, block_tables, seq_lens, writes,
                              **_model_kw(opts))
        return collect(hidden, jnp.arange(b)), cache
    m_count = pipeline.num_microbatches(b, opts.num_stages)
    mb = b // m_count
    x = model.embed_tokens(tokens, reduce_dtype=opts.reduce_dtype)
    xs = x.reshape(m_count, mb, *x.shape[1:])  # [M, mb, T, D]

    def stage_fn(x, cache, m, valid):
        w = jnp.where(valid, _rows(writes, m, mb), -1)  # no writes in the bubble
        return model.run_layers(x, _rows(positions, m, mb), cache, _rows(block_tables, m, mb),
                                _rows(seq_lens, m, mb), w, **_model_kw(opts))

    def pick(x, m):
        return collect(x, m * mb + jnp.arange(mb))

    out, cache = pipeline.gpipe(stage_fn, pick, xs, cache, num_stages=opts.num_stages)
    out = out.reshape(b, *out.shape[2:])
    return model.norm(out), cache


# -- sampling ----------------------------------------------------------------------------------


def _params(fp: jax.Array, ip: jax.Array) -> SamplingParams:
    return SamplingParams(temperature=fp[:, pk.F_TEMPERATURE], top_k=ip[:, pk.I_TOP_K],
                          top_p=fp[:, pk.F_TOP_P], min_p=fp[:, pk.F_MIN_P],
                          repetition_penalty=fp[:, pk.F_REPETITION],
                          presence_penalty=fp[:, pk.F_PRESENCE],
                          frequency_penalty=fp[:, pk.F_FREQUENCY])


def _penalized(fp: jax.Array) -> jax.Array:
    return ((fp[:, pk.F_REPETITION] != 1) | (fp[:, pk.F_PRESENCE] != 0)
            | (fp[:, pk.F_FREQUENCY] != 0))


def _choose(logits: jax.Array, state: SlotState, slot: jax.Array, fp: jax.Array, ip: jax.Array,
            positions: jax.Array, counted: jax.Array, *, full: bool, num_logprobs: int
            ) -> tuple[jax.Array, SlotState, jax.Array]:
    """Sample one token per row from logits [B, V] f32 for rows whose slots are `slot` [B];
    `positions` [B] are the sampled tokens' positions (their PRNG keys fold them in),
    `counted` [B] marks rows whose token is a real output (penalty counts). Returns
    (tokens [B], state with counts updated, output rows [B, packing.output_width]).

    `full` is static: False is plain argmax (an all-greedy batch without penalties or logprobs
    pays nothing more); True runs penalties, sampling and logprobs for every row (neutral
    parameters leave a row's logits unchanged)."""
    bits = jax.lax.bitcast_convert_type
    if not full:
        tokens = greedy_tokens(logits)
        return tokens, state, tokens[:, None]
    logits = whole_rows(logits)
    params = _params(fp, ip)
    pen = counted & _penalized(fp)
    scored = apply_penalties(logits, params, state.prompt_mask[slot], state.output_counts[slot])
    keys = bits(ip[:, pk.I_KEY_HI: pk.I_KEY_LO + 1], jnp.uint32)
    tokens = sample(scored, params, keys, positions, use_sampling=True)
    counts = state.output_counts.at[slot, tokens].add(pen.astype(jnp.int32), mode="drop")
    state = dataclasses.replace(state, output_counts=counts)
    chosen, ids, lps = token_logprobs(logits, tokens, num_logprobs)
    out = jnp.concatenate([tokens[:, None], bits(chosen, jnp.int32)[:, None], ids,
                           bits(lps, jnp.int32)], axis=1)
    return tokens, state, out


def _stopped(tokens: jax.Array, ip: jax.Array, stop_ids: jax.Array,
             eos_ids: tuple[int, ...]) -> jax.Array:
    """[B] bool: the token ends its row (EOS unless the row ignores it, or a stop id)."""
    hit = jnp.any(tokens[:, None] == stop_ids, axis=1)
    if eos_ids:
        eos = jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))
        hit |= eos & (ip[:, pk.I_IGNORE_EOS] == 0)
    return hit


def _deactivate_scratch(state: SlotState) -> SlotState:
    scratch = state.active.shape[0] - 1
    return dataclasses.replace(state, active=state.active.at[scratch].set(False))


# -- prefill -----------------------------------------------------------------------------------


def prefill_step(graphdef, params, cache: PagedKVCache, state: SlotState, inputs: jax.Array, *,
                 opts: StepOptions, layout: pk.PrefillLayout, proposer=None, pparams=None,
                 pstate=None):
    """A chunk of up to T known tokens for each of R rows (inputs [R, layout.row_width]);
    returns (cache, state, output rows [R, 2 + 2k]), or (cache, state, proposer state, output
    rows) with a `proposer` (`jaxinfer.speculative.api.Proposer`), whose `prefill` sees the same
    chunk. Rows with the sample flag sample the next token and (re)start their slot with the
    row's parameters."""
    model = nnx.merge(graphdef, params)
    g = cache.page_size
    scratch = state.tokens.shape[0] - 1
    vocab = state.prompt_mask.shape[1]
    tok, bt = inputs[:, layout.tokens], inputs[:, layout.block_table]
    meta = inputs[:, layout.meta]
    slot, start, length, sample_flag, prompt_len, max_len = (meta[:, i] for i in
                                                             range(pk.NUM_META))
    ip = inputs[:, layout.ints]
    stop_ids = inputs[:, layout.stop_ids]
    fp = jax.lax.bitcast_convert_type(inputs[:, layout.floats], jnp.float32)
    real = length > 0
    slot = jnp.where(real, slot, scratch)
    j = jnp.arange(layout.chunk, dtype=jnp.int32)
    in_chunk = j[None, :] < length[:, None]
    # Padding columns sit at position 0: dynamic RoPE scaling reads a row's largest position
    # as its length, so they must not count.
    positions = jnp.where(in_chunk, start[:, None] + j[None, :], 0)  # [R, T]
    writes = write_slots(bt, positions, in_chunk, g)
    seq_lens = jnp.where(real, start + length, 0)
    last_index = jnp.maximum(length - 1, 0)

    def collect(x, rows):  # each row's hidden state at its last chunk token
        return jnp.take_along_axis(x, last_index[rows][:, None, None], axis=1)[:, 0]

    last, cache = _forward(model, opts, cache, tok, positions, bt, seq_lens, writes, collect)
    logits = model.logits(last, kernels=opts.kernels)
    if proposer is not None:
        from jaxinfer.speculative.api import PrefillChunk

        pstate = proposer.prefill(pparams, pstate, PrefillChunk(
            tokens=tok, positions=positions, block_tables=bt, seq_lens=seq_lens,
            writes=writes, slots=slot))

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
    state = dataclasses.replace(state, floats=state.floats.at[slot].set(fp),
                                ints=state.ints.at[slot].set(ip),
                                stop_ids=state.stop_ids.at[slot].set(stop_ids),
                                prompt_mask=mask, output_counts=counts)
    sampled = real & (sample_flag > 0)
    tokens, state, out = _choose(logits, state, slot, fp, ip, seq_lens, sampled, full=True,
                                 num_logprobs=opts.num_logprobs)
    remaining = max_len - seq_lens - 1  # tokens it may sample after this one
    active = sampled & (remaining > 0) & ~_stopped(tokens, ip, stop_ids, opts.eos_ids)
    keep = jnp.where(sampled, slot, scratch)
    state = dataclasses.replace(
        state, tokens=state.tokens.at[keep].set(tokens),
        seq_lens=state.seq_lens.at[slot].set(seq_lens),
        remaining=state.remaining.at[slot].set(jnp.where(sampled, remaining, 0)),
        active=state.active.at[slot].set(active))
    if state.keeps_history:
        h = state.history.shape[1]
        hist = state.history.at[rows, jnp.where(in_chunk, positions, h)].set(tok, mode="drop")
        hist = hist.at[keep, jnp.where(sampled, seq_lens, h)].set(tokens, mode="drop")
        state = dataclasses.replace(state, history=hist)
    state = _deactivate_scratch(state)
    if proposer is not None:
        return cache, state, pstate, out
    return cache, state, out


# -- decode ------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Packet:
    """What one decode micro-batch carries from stage to stage."""

    x: jax.Array  # [mb, 1, D] activations
    meta: jax.Array  # [mb, 3] int32: position, cache slot (-1: no write), attention length


def _feed(state: SlotState, slot: jax.Array, block_tables: jax.Array, page_size: int):
    """(token [B], position [B], write slot [B], attention length [B], active [B]) of the
    token each row feeds."""
    act = state.active[slot]
    pos = state.seq_lens[slot]
    write = write_slots(block_tables, pos[:, None], act[:, None], page_size)[:, 0]
    return state.tokens[slot], pos, write, jnp.where(act, pos + 1, 0), act


def _advance(state: SlotState, slot: jax.Array, logits: jax.Array, act: jax.Array,
             pos: jax.Array, *, opts: StepOptions, full: bool
             ) -> tuple[SlotState, jax.Array]:
    """Sample each row's next token, stop rows on device and step their slots; returns (state,
    output rows [B, C] with token -1 for rows that were not active)."""
    fp, ip = state.floats[slot], state.ints[slot]
    tokens, state, out = _choose(logits, state, slot, fp, ip, pos + 1, act, full=full,
                                 num_logprobs=opts.num_logprobs)
    remaining = state.remaining[slot] - 1
    stop = _stopped(tokens, ip, state.stop_ids[slot], opts.eos_ids) | (remaining <= 0)
    if state.keeps_history:
        h = state.history.shape[1]
        state = dataclasses.replace(state, history=state.history.at[
            slot, jnp.where(act, pos + 1, h)].set(tokens, mode="drop"))
    state = dataclasses.replace(
        state,
        tokens=state.tokens.at[slot].set(jnp.where(act, tokens, state.tokens[slot])),
        seq_lens=state.seq_lens.at[slot].set(jnp.where(act, pos + 1, pos)),
        remaining=state.remaining.at[slot].set(jnp.where(act, remaining,
                                                         state.remaining[slot])),
        active=state.active.at[slot].set(act & ~stop))
    out = out.at[:, 0].set(jnp.where(act, tokens, -1))
    return _deactivate_scratch(state), out


def decode_step(graphdef, params, cache: PagedKVCache, state: SlotState, inputs: jax.Array, *,
                opts: StepOptions, num_steps: int, full: bool
                ) -> tuple[PagedKVCache, SlotState, jax.Array]:
    """`num_steps` tokens for each of B slots (inputs [B, 1 + W]: slot | block table); returns
    (cache, state, output rows [num_steps, B, C])."""
    model = nnx.merge(graphdef, params)
    g = cache.page_size
    slot, bt = inputs[:, 0], inputs[:, 1:]
    if opts.num_stages > 1:
        return _decode_pipelined(model, cache, state, slot, bt, opts=opts,
                                 num_steps=num_steps, full=full)

    def one(carry, _):
        cache, st = carry
        tok, pos, write, lens, act = _feed(st, slot, bt, g)
        hidden, cache = model(tok[:, None], pos[:, None], cache, bt, lens, write[:, None],
                              **_model_kw(opts))
        logits = model.logits(hidden[:, 0], kernels=opts.kernels)
        st, out = _advance(st, slot, logits, act, pos, opts=opts, full=full)
        return (cache, st), out

    (cache, state), out = jax.lax.scan(one, (cache, state), None, length=num_steps)
    return cache, state, out


def _decode_pipelined(model, cache: PagedKVCache, state: SlotState, slot: jax.Array,
                      bt: jax.Array, *, opts: StepOptions, num_steps: int, full: bool):
    """`decode_step` on `sharding.pipeline.pipelined_decode`: micro-batch m is rows
    [m * mb, (m + 1) * mb)."""
    b = slot.shape[0]
    m_count = pipeline.num_microbatches(b, opts.num_stages)
    mb = b // m_count
    g = cache.page_size
    width = 1 if not full else pk.output_width(opts.num_logprobs, full=True)
    scratch = state.tokens.shape[0] - 1

    def inject(carry, m):
        st = carry[0]
        tok, pos, write, lens, _ = _feed(st, _rows(slot, m, mb), _rows(bt, m, mb), g)
        return _Packet(x=model.embed_tokens(tok[:, None], reduce_dtype=opts.reduce_dtype),
                       meta=jnp.stack([pos, write, lens], axis=1))

    def stage_fn(pkt, cache, m, valid):
        pos, write, lens = pkt.meta[:, 0], pkt.meta[:, 1], pkt.meta[:, 2]
        write = jnp.where(valid, write, -1)  # no writes in the bubble
        x, cache = model.run_layers(pkt.x, pos[:, None], cache, _rows(bt, m, mb), lens,
                                    write[:, None], **_model_kw(opts))
        return dataclasses.replace(pkt, x=x), cache

    def finish(carry, pkt, m, k, done):
        st, out = carry
        rows_slot = jnp.where(done, _rows(slot, m, mb), scratch)  # off-schedule: scratch only
        act = st.active[rows_slot]
        pos = st.seq_lens[rows_slot]
        logits = model.logits(model.norm(pkt.x[:, 0]), kernels=opts.kernels)
        st, rows_out = _advance(st, rows_slot, logits, act, pos, opts=opts, full=full)
        old = jax.lax.dynamic_slice(out, (k, m * mb, 0), (1, mb, width))
        new = jnp.where(done, rows_out[None], old)
        return st, jax.lax.dynamic_update_slice(out, new, (k, m * mb, 0))

    out0 = jnp.full((num_steps, b, width), -1, jnp.int32)
    (state, out), cache = pipeline.pipelined_decode(
        inject=inject, stage_fn=stage_fn, finish=finish, state=(state, out0), carry=cache,
        num_steps=num_steps, num_microbatches=m_count, num_stages=opts.num_stages)
    return cache, state, out


# -- verify ------------------------------------------------------------------------------------


def verify_step(graphdef, params, cache: PagedKVCache, inputs: jax.Array, *, opts: StepOptions,
                chunk: int, width: int) -> tuple[PagedKVCache, jax.Array]:
    """Feed T known tokens per row and return the logits of every position: inputs [B, T + W +
    2] (tokens [T] | block table [W] | start | length, 0 = padding row); returns (cache,
    float32 logits [B, T, V]; positions past a row's length are padding)."""
    model = nnx.merge(graphdef, params)
    tok, bt = inputs[:, :chunk], inputs[:, chunk: chunk + width]
    start, length = inputs[:, chunk + width], inputs[:, chunk + width + 1]
    j = jnp.arange(chunk, dtype=jnp.int32)
    real = j[None, :] < length[:, None]
    positions = jnp.where(real, start[:, None] + j[None, :], 0)  # padding: see prefill_step
    writes = write_slots(bt, positions, real, cache.page_size)
    seq_lens = jnp.where(length > 0, start + length, 0)

    def collect(x, rows):
        return x

    hidden, cache = _forward(model, opts, cache, tok, positions, bt, seq_lens, writes, collect)
    return cache, model.logits(hidden, kernels=opts.kernels)


# -- speculative decoding ----------------------------------------------------------------------

# Column 0 of the extra output row of a speculative step packs (drafts proposed, drafts the
# verifier accepted) per row as proposed + SPEC_PACK * accepted (both <= 7).
SPEC_PACK = 8


@dataclasses.dataclass(frozen=True)
class SpecOptions:
    """Static choices of the speculative programs (from the SpeculativeConfig)."""

    acceptance: str  # "rejection" | "typical" | "synthetic"
    typical_threshold: float = 0.09
    typical_alpha: float = 0.3


def speculative_step(graphdef, params, pparams, cache: PagedKVCache, state: SlotState, pstate,
                     inputs: jax.Array, *, opts: StepOptions, proposer, spec: SpecOptions,
                     k: int, full: bool):
    """One speculative step for each of B slots (inputs [B, 1 + W]: slot | block table): the
    proposer drafts up to k tokens, the target scores the last token and the drafts in one
    pass (1 + k query tokens per row), the verifier keeps a prefix of the drafts and adds one
    token, and each row stops on device as decode rows do (EOS, stop ids, max tokens) inside
    the kept run. Returns (cache, state, proposer state, output rows [k + 2, B, C]): rows
    0..k are the emitted tokens in order (-1 past a row's count), row k + 1 packs the step's
    proposal statistics (`SPEC_PACK`). The KV written at rejected positions is overwritten
    when the sequence gets there."""
    from jaxinfer.speculative.api import ProposeInputs
    from jaxinfer.speculative.verify import verify

    model = nnx.merge(graphdef, params)
    g = cache.page_size
    slot, bt = inputs[:, 0], inputs[:, 1:]
    act = state.active[slot]
    p = state.seq_lens[slot]
    t0 = state.tokens[slot]
    fp, ip = state.floats[slot], state.ints[slot]
    keys = jax.lax.bitcast_convert_type(ip[:, pk.I_KEY_HI: pk.I_KEY_LO + 1], jnp.uint32)
    sp = _params(fp, ip) if full else None
    inp = ProposeInputs(tokens=t0, positions=p, history=state.history[slot], block_tables=bt,
                        active=act, slots=slot, keys=keys, sampling=sp, page_size=g)
    pstate, prop = proposer.propose(pparams, pstate, inp, k)
    remaining = state.remaining[slot]
    nd = jnp.where(act, jnp.clip(jnp.minimum(prop.num_tokens, remaining - 1), 0, k), 0)
    prop = dataclasses.replace(prop, tokens=prop.tokens.astype(jnp.int32), num_tokens=nd)
    j = jnp.arange(k + 1, dtype=jnp.int32)
    feed = jnp.concatenate([t0[:, None], prop.tokens], axis=1)  # [B, 1 + k]
    positions = p[:, None] + j[None, :]
    valid = act[:, None] & (j[None, :] <= nd[:, None])
    writes = write_slots(bt, positions, valid, g)
    seq_lens = jnp.where(act, p + 1 + nd, 0)
    hidden, cache = model(feed, jnp.where(valid, positions, p[:, None]), cache, bt, seq_lens,
                          writes, rope_per_token=True, **_model_kw(opts))
    logits = model.logits(hidden, kernels=opts.kernels)  # [B, 1 + k, V] float32
    pen = act & _penalized(fp)
    accepted, emitted = verify(
        logits, prop, params=sp, keys=keys, positions=p + 1,
        prompt_mask=state.prompt_mask[slot] if full else None,
        counts=state.output_counts[slot] if full else None, penalize=pen if full else None,
        acceptance=spec.acceptance, full=full, threshold=spec.typical_threshold,
        alpha=spec.typical_alpha,
        rate=pparams["acceptance_rate"] if spec.acceptance == "synthetic" else 0.0)
    accepted = jnp.minimum(accepted, nd)

    # Stops inside the kept run: the first stop token ends the row, as do its max tokens.
    count = jnp.minimum(accepted + 1, remaining)
    stop_ids = state.stop_ids[slot]
    hit = jnp.stack([_stopped(emitted[:, i], ip, stop_ids, opts.eos_ids)
                     for i in range(k + 1)], axis=1) & (j[None, :] < count[:, None])
    first = jnp.min(jnp.where(hit, j[None, :], k + 1), axis=1)
    count = jnp.where(act, jnp.minimum(count, first + 1), 0)
    stopped = first < count  # a stop token among the emitted ones
    out_tok = jnp.where(j[None, :] < count[:, None], emitted, -1)
    last = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    left = remaining - count
    h = state.history.shape[1]
    vocab = state.output_counts.shape[1]
    rows = jnp.broadcast_to(slot[:, None], out_tok.shape)
    kept = out_tok >= 0
    counts = state.output_counts
    if full:
        counts = counts.at[rows, jnp.where(kept & pen[:, None], out_tok, vocab)].add(
            1, mode="drop")
    state = dataclasses.replace(
        state,
        tokens=state.tokens.at[slot].set(jnp.where(act, last, t0)),
        seq_lens=state.seq_lens.at[slot].set(p + count),
        remaining=state.remaining.at[slot].set(jnp.where(act, left, remaining)),
        active=state.active.at[slot].set(act & ~stopped & (left > 0)),
        history=state.history.at[rows, jnp.where(kept, p[:, None] + 1 + j[None, :], h)].set(
            out_tok, mode="drop"),
        output_counts=counts)
    pstate = proposer.commit(pparams, pstate, inp, jnp.maximum(count - 1, 0), k)

    b = slot.shape[0]
    if full:
        flat = logits.reshape(b * (k + 1), -1)
        chosen, ids, lps = token_logprobs(whole_rows(flat), jnp.maximum(out_tok, 0).reshape(-1),
                                          opts.num_logprobs)
        bits = jax.lax.bitcast_convert_type
        rows_out = jnp.concatenate([out_tok.reshape(-1, 1), bits(chosen, jnp.int32)[:, None],
                                    ids, bits(lps, jnp.int32)], axis=1)
        rows_out = rows_out.reshape(b, k + 1, -1).transpose(1, 0, 2)
    else:
        rows_out = out_tok.T[:, :, None]
    stats = jnp.zeros((1, b, rows_out.shape[2]), jnp.int32)
    stats = stats.at[0, :, 0].set(nd + SPEC_PACK * accepted)
    return cache, _deactivate_scratch(state), pstate, jnp.concatenate([rows_out, stats], axis=0)
