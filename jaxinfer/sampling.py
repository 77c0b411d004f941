"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, penalties, logprobs, per row.

Each row has its own parameters and its own key; the key used for a token is
`fold_in(row_key, position)`, so a row's samples depend only on its seed and where it is in its
sequence, never on what else shares the batch (a property serving relies on).

A decode step composes the pieces in this order (all inside one jitted function):

    penalized = apply_penalties(logits, params, prompt_mask, output_counts)  # if uses_penalties()
    tokens = sample(penalized, params, keys, positions, use_sampling=...)
    lp, top_ids, top_lp = token_logprobs(logits, tokens, k)  # the raw logits, if asked for
    output_counts = count_tokens(output_counts, tokens, valid)

Penalties need two [B, V] per-row tensors the caller keeps on device: `prompt_mask` (built once
per sequence with `token_mask`) and `output_counts` (updated every step with `count_tokens`).
Logprobs are of the model's raw distribution (before penalties, temperature and filters), which is
what vLLM returns by default and what is comparable across sampling settings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import RequestError
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

    @staticmethod
    def make(batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, presence_penalty=0.0,
             frequency_penalty=0.0) -> SamplingParams:
        """Host-side constructor; each argument is a scalar or a length-`batch` sequence."""
        def col(x, dtype):
            try:
                return np.broadcast_to(np.asarray(x, dtype=dtype), (batch,)).copy()
            except (TypeError, ValueError) as e:
                raise RequestError(f"sampling values must be numbers, one or {batch}: {e}") from e
        params = SamplingParams(
            temperature=col(temperature, np.float32), top_k=col(top_k, np.int32),
            top_p=col(top_p, np.float32), min_p=col(min_p, np.float32),
            repetition_penalty=col(repetition_penalty, np.float32),
            presence_penalty=col(presence_penalty, np.float32),
            frequency_penalty=col(frequency_penalty, np.float32))
        validate(params)
        return params

    def uses_sampling(self) -> bool:
        """Whether any row samples (host arrays only); all-greedy batches compile a cheaper step."""
        return bool(np.any(np.asarray(self.temperature) > 0))

    def uses_penalties(self) -> bool:
        """Whether any row has a penalty on (host arrays only); batches without skip the
        [B, V] penalty pass and the token counting."""
        return bool(np.any(np.asarray(self.repetition_penalty) != 1)
                    or np.any(np.asarray(self.presence_penalty) != 0)
                    or np.any(np.asarray(self.frequency_penalty) != 0))

    def pad(self, batch: int) -> SamplingParams:
        """Pad rows to `batch` with greedy, unpenalized rows (host arrays)."""
        def p(x, fill):
            x = np.asarray(x)
            return np.concatenate([x, np.full(batch - len(x), fill, x.dtype)])
        return SamplingParams(temperature=p(self.temperature, 0), top_k=p(self.top_k, 0),
                              top_p=p(self.top_p, 1), min_p=p(self.min_p, 0),
                              repetition_penalty=p(self.repetition_penalty, 1),
                              presence_penalty=p(self.presence_penalty, 0),
                              frequency_penalty=p(self.frequency_penalty, 0))


def validate(params: SamplingParams) -> None:
    """Raise RequestError for values no sampler accepts (host arrays)."""
    t, k, p, m = (np.asarray(params.temperature), np.asarray(params.top_k),
                  np.asarray(params.top_p), np.asarray(params.min_p))
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise RequestError(f"temperature must be a finite number >= 0, got {t.tolist()}")
    if np.any(k < 0):
        raise RequestError(f"top_k must be >= 0 (0 = off), got {k.tolist()}")
    if not np.all((p > 0) & (p <= 1)):
        raise RequestError(f"top_p must be in (0, 1], got {p.tolist()}")
    if not np.all((m >= 0) & (m <= 1)):
        raise RequestError(f"min_p must be in [0, 1], got {m.tolist()}")
    r = np.asarray(params.repetition_penalty)
    if not np.all(np.isfinite(r) & (r > 0)):
        raise RequestError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                           f"got {r.tolist()}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = np.asarray(getattr(params, name))
        # NaN fails both comparisons, so it is refused here too.
        if not np.all((v >= -2) & (v <= 2)):
            raise RequestError(f"{name} must be in [-2, 2] (0 = off), got {v.tolist()}")


def row_keys(seeds) -> np.ndarray:
    """Raw uint32 PRNG keys [B, 2] from integer seeds [B] (host)."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    return np.stack([(seeds >> 32).astype(np.uint32), (seeds & 0xFFFFFFFF).astype(np.uint32)], -1)


def _sample_row(logits: jax.Array, t: jax.Array, k: jax.Array, p: jax.Array, m: jax.Array,
                key: jax.Array) -> jax.Array:
    """Sample one token from logits [V] (float32)."""
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
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits)
    return order[choice].astype(jnp.int32)


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
    in_output = output_counts > 0
    rep = jnp.where(prompt_mask | in_output, params.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = logits - params.frequency_penalty[:, None] * output_counts.astype(logits.dtype)
    return logits - params.presence_penalty[:, None] * in_output.astype(logits.dtype)


def token_mask(
    tokens: jax.Array,  # [B, T] int32
    valid: jax.Array,  # [B, T] bool: which entries are real tokens (not padding)
    vocab: int,
) -> jax.Array:
    """[B, V] bool: which vocabulary entries occur among each row's valid tokens (a prompt
    mask for `apply_penalties`). Ids outside [0, vocab) are ignored."""
    b = tokens.shape[0]
    counts = count_tokens(jnp.zeros((b, vocab), jnp.int32), tokens, valid)
    return counts > 0


def count_tokens(
    output_counts: jax.Array,  # [B, V] int32
    tokens: jax.Array,  # [B] or [B, T] int32
    valid: jax.Array,  # same shape as tokens, bool
) -> jax.Array:
    """`output_counts` [B, V] with one added at each valid (row, token): a scatter-add, cheap
    enough to run inside every jitted decode step. Accepts several tokens per row ([B, T]), as a
    speculative step accepts. Ids outside [0, V) are dropped."""
    if tokens.ndim == 1:
        tokens, valid = tokens[:, None], valid[:, None]
    b, t = tokens.shape
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    return output_counts.at[rows, tokens].add(valid.astype(output_counts.dtype), mode="drop")


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
