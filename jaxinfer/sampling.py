"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, per row.

Each row has its own parameters and its own key; the key used for a token is
`fold_in(row_key, position)`, so a row's samples depend only on its seed and where it is in its
sequence, never on what else shares the batch (a property serving relies on).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import RequestError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """Per-row sampling parameters, all [B]. temperature 0 = greedy; top_k 0, top_p 1 and
    min_p 0 switch the filter off."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32

    @staticmethod
    def make(batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> SamplingParams:
        """Host-side constructor; each argument is a scalar or a length-`batch` sequence."""
        def col(x, dtype):
            return np.broadcast_to(np.asarray(x, dtype=dtype), (batch,)).copy()
        params = SamplingParams(temperature=col(temperature, np.float32), top_k=col(top_k, np.int32),
                                top_p=col(top_p, np.float32), min_p=col(min_p, np.float32))
        validate(params)
        return params

    def uses_sampling(self) -> bool:
        """Whether any row samples (host arrays only); all-greedy batches compile a cheaper step."""
        return bool(np.any(np.asarray(self.temperature) > 0))

    def pad(self, batch: int) -> SamplingParams:
        """Pad rows to `batch` with greedy rows (host arrays)."""
        def p(x, fill):
            x = np.asarray(x)
            return np.concatenate([x, np.full(batch - len(x), fill, x.dtype)])
        return SamplingParams(temperature=p(self.temperature, 0), top_k=p(self.top_k, 0),
                              top_p=p(self.top_p, 1), min_p=p(self.min_p, 0))


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


def row_keys(seeds) -> np.ndarray:
    """Raw uint32 PRNG keys [B, 2] from integer seeds [B] (host)."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    return np.stack([(seeds >> 32).astype(np.uint32), (seeds & 0xFFFFFFFF).astype(np.uint32)], -1)


def _sample_row(logits: jax.Array, t: jax.Array, k: jax.Array, p: jax.Array, m: jax.Array,
                key: jax.Array) -> jax.Array:
    """Sample one token from logits [V] (float32)."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(t, 1e-6)
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
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not use_sampling:
        return greedy
    step_keys = jax.vmap(lambda kd, pos: jax.random.fold_in(jax.random.wrap_key_data(kd), pos))(
        keys, positions)
    sampled = jax.vmap(_sample_row)(logits, params.temperature, params.top_k, params.top_p,
                                    params.min_p, step_keys)
    return jnp.where(params.temperature > 0, sampled, greedy)
