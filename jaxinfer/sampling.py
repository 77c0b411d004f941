"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, penalties, logprobs, per row.

Each row has its own parameters and its own key; the key used for a token is
`fold_in(row_key, position)`, so a row's samples depend only on its seed and where it is in its
sequence, never on what else shares the batch (a property serving relies on).

A decode step composes the pieces in this order (all inside one jitted function,
`jaxinfer.steps._choose`):

    penalized = apply_penalties(logits, params, prompt_mask, output_counts)
    tokens = sample(penalized, params, keys, positions, use_sampling=...)
    lp, top_ids, top_lp = token_logprobs(logits, tokens, k)  # the raw logits, if asked for

Penalties need two [B, V] per-row tensors the caller keeps on device (`SlotState.prompt_mask`,
built from a sequence's prompt chunks, and `SlotState.output_counts`, updated with every token
it samples). Parameter values are checked once, on the host, by
`jaxinfer.engine.request.validate_request`.
Logprobs are of the model's raw distribution (before penalties, temperature and filters), which is
what vLLM returns by default and what is comparable across sampling settings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sharding.rules import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """Per-row sampling parameters, all [B]. temperature 0 = greedy; top_k 0, top_p 1 and
    min_p 0 switch the filter off; repetition_penalty 1 and presence/frequency_penalty 0 switch
    the penalties off (see `apply_penalties`)."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32


def _sample_row(logits: jax.Array, t: jax.Array, k: jax.Array, p: jax.Array, m: jax.Array,
                key: jax.Array) -> jax.Array:
    """Sample one token from logits [V] (float32)."""
    order, sorted_logits = _filtered_sorted(logits, t, k, p, m)
    choice = jax.random.categorical(key, sorted_logits)
    return order[choice].astype(jnp.int32)


def _filtered_sorted(logits: jax.Array, t: jax.Array, k: jax.Array, p: jax.Array,
                     m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order, tempered logits in that order with filtered tokens at -inf) of one row [V]:
    temperature, then top-k, top-p and min-p. The one definition of the sampled distribution
    (plain sampling draws from it, speculative verification scores drafts against it)."""
    vocab = logits.shape[-1]
    # Greedy rows (t == 0) take the argmax elsewhere; divide them by 1 so nothing overflows here.
    scaled = logits / jnp.where(t > 0, t, 1.0)
    order = jnp.argsort(-scaled)  # descending
    sorted_logits = scaled[order]
    rank = jnp.arange(vocab)
    keep = jnp.where(k > 0, rank < k, True)
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits)
    before = jnp.cumsum(probs) - probs  # mass strictly before each token
    keep &= before < p  # top-p: smallest prefix reaching p; the first token always stays
    keep &= probs >= m * probs[0]  # min-p, relative to the most likely token
    return order, jnp.where(keep, sorted_logits, -jnp.inf)


def sampling_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The distribution `sample` draws from, [B, V] float32 in vocabulary order (penalties
    already applied to `logits`); a greedy row (temperature 0) is one-hot at its argmax."""
    def row(lg, t, k, p, m):
        order, sorted_logits = _filtered_sorted(lg, t, k, p, m)
        return jnp.zeros_like(lg).at[order].set(jax.nn.softmax(sorted_logits))

    logits = whole_rows(logits)
    probs = jax.vmap(row)(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    onehot = jax.nn.one_hot(greedy_tokens(logits), logits.shape[-1], dtype=probs.dtype)
    return jnp.where((params.temperature > 0)[:, None], probs, onehot)


def sample(
    logits: jax.Array,  # [B, V] float32
    params: SamplingParams,
    keys: jax.Array,  # [B, 2] uint32 raw row keys
    positions: jax.Array,  # [B] int32 position of the token being sampled
    *,
    use_sampling: bool,
) -> jax.Array:
    """Next tokens [B] int32. With `use_sampling=False` every row is greedy (static, so
    greedy-only batches skip the sort)."""
    greedy = greedy_tokens(logits)
    if not use_sampling:
        return greedy
    logits = whole_rows(logits)
    step_keys = jax.vmap(lambda kd, pos: jax.random.fold_in(jax.random.wrap_key_data(kd), pos))(
        keys, positions)
    sampled = jax.vmap(_sample_row)(logits, params.temperature, params.top_k, params.top_p,
                                    params.min_p, step_keys)
    return jnp.where(params.temperature > 0, sampled, greedy)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """argmax over the vocabulary: logits [B, V] -> [B] int32, the first of equal maxima.

    Written as two reductions (the row max, then the smallest index holding it) because GSPMD
    partitions each over a vocab-split row (tp) as a local reduction plus one [B] all-reduce;
    `jnp.argmax`'s paired (value, index) reduction became two NCCL all-gathers of per-device
    candidates per token instead (on two H200s they showed ~1 ms of stream time each at batch
    1, mostly waiting; removing them did not shorten the step measurably). A row with a NaN
    gives token V - 1 rather than an out-of-range id."""
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.arange(vocab, dtype=jnp.int32)
    first = jnp.min(jnp.where(logits == best, ids, vocab), axis=-1)
    return jnp.minimum(first, vocab - 1)


def whole_rows(logits: jax.Array) -> jax.Array:
    """Logits [B, V] with each row whole on every tensor-parallel device (a no-op off a mesh).

    The LM head leaves logits split over the vocabulary (`sharding.rules`: vocab on tp); argmax
    partitions well over a split row, but the sort, cumulative sums and scatters of sampling and
    penalties do not: left to GSPMD, a serving prefill program with this sampler took 1.08 s at
    tp=2 instead of 9 ms at tp=1 (H200, 4 rows of a 128k vocabulary); gathered first, 7.7 ms.
    The gather moves B x V float32 once (2 MB for those 4 rows)."""
    return constrain(logits, ("batch", None))


def apply_penalties(
    logits: jax.Array,  # [B, V] float32
    params: SamplingParams,
    prompt_mask: jax.Array,  # [B, V] bool: token occurs in the row's prompt
    output_counts: jax.Array,  # [B, V] int32: times the token was generated so far
) -> jax.Array:
    """Penalized logits [B, V] float32, with vLLM's semantics: the repetition penalty r applies to
    every token seen in the prompt or the output (a positive logit is divided by r, any other is
    multiplied by it), then the frequency penalty subtracts `frequency * count` and the presence
    penalty subtracts `presence` from every token generated at least once (output only)."""
    return penalized(logits, prompt_mask, output_counts, params.repetition_penalty[:, None],
                     params.presence_penalty[:, None], params.frequency_penalty[:, None])


def penalized(logits: jax.Array, in_prompt: jax.Array, counts: jax.Array, repetition: jax.Array,
              presence: jax.Array, frequency: jax.Array) -> jax.Array:
    """`apply_penalties` elementwise (broadcasting): a logit given whether its token is in the
    prompt and how often it was generated (speculative verification re-scores draft tokens
    with counts that include the drafts before them)."""
    in_output = counts > 0
    rep = jnp.where(in_prompt | in_output, repetition, 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency * counts.astype(logits.dtype)
    return logits - presence * in_output.astype(logits.dtype)


def token_logprobs(
    logits: jax.Array,  # [B, V] float32, unprocessed model output
    tokens: jax.Array,  # [B] int32
    k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities under the raw model distribution (log_softmax of `logits`):
    (logprob of `tokens` [B] float32, top-k ids [B, k] int32, top-k logprobs [B, k] float32,
    most likely first). `k` is static; k = 0 returns empty [B, 0] arrays."""
    if k < 0 or k > logits.shape[-1]:
        raise ValueError(f"k must be in [0, {logits.shape[-1]}], got {k}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    b = logits.shape[0]
    if k == 0:
        return chosen, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen, top_ids.astype(jnp.int32), top_lp
