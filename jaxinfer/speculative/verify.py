"""Verification of draft tokens against the target's logits: which drafts a row keeps and the
one token the target adds. Pure functions over [B, 1 + k, V] logits; `steps.speculative_step`
calls `verify` inside the engine's programs.

Row j of the target's logits (fed token at position P + j) gives the distribution of the token
at P + j + 1: draft d_{j+1} is scored by row j, and the token after the kept drafts comes from
row a (a = drafts kept).

- Greedy rows (temperature 0): keep drafts while each equals the target's argmax, then add the
  argmax at the first mismatch (or after the last draft). The output equals plain greedy
  decoding token for token.
- Sampling rows, `"rejection"` (lossless; Leviathan et al. 2023, Chen et al. 2023): keep d
  with probability min(1, p(d) / q(d)); at the first rejection sample from norm(max(p - q, 0));
  after k kept drafts sample a bonus token from p. p is exactly the distribution plain
  decoding samples from (penalties with the drafts before counted, temperature, top-k, top-p,
  min-p: `jaxinfer.sampling.sampling_probs`); q is the proposal's (one-hot for deterministic
  drafts). Each decision draws from a key of (row seed, position, salt), so a row's tokens
  never depend on its batch mates.
- Sampling rows, `"coupled"` (lossless, opt-in): the target's token at each position is drawn
  exactly as plain decoding draws it there (same filtered distribution, same key: the row's
  seed folded with the position), and a draft is kept while it equals that token. The output
  is plain seeded decoding token for token, whatever the depth, the batch or preemption did.
  A draft is kept with probability p(d) for deterministic drafts, as with rejection; a draft
  model samples with the target's key at the same position, so the two share their noise.
- `"typical"` (opt-in, lossy; Medusa's typical acceptance, Cai et al. 2024): keep d while
  p(d) > min(epsilon, delta * exp(-H(p))), then sample from p.
- `"synthetic"` (the bench's controlled acceptance, vLLM's synthetic rejection mode): keep each
  draft with probability `rate` whatever it is, and emit the target's argmax tokens; its text
  is not the model's, only its cost is real.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.sampling import (SamplingParams, greedy_tokens, penalized, sample,
                               sampling_probs, whole_rows)
from jaxinfer.speculative.api import Proposal, fold

ACCEPT_SALT = 0x5EC0
BONUS_SALT = 0x5EC1


def score_rows(logits: jax.Array, params: SamplingParams, prompt_mask: jax.Array,
               counts: jax.Array, drafts: jax.Array, penalize: jax.Array) -> jax.Array:
    """Penalized logits of every verify row [B, K1, V]: row j counts the row's outputs so far
    (`counts` [B, V]) plus drafts d_1..d_j, as plain decoding would after emitting them. Rows
    with `penalize` [B] False are returned unchanged."""
    b, k1, v = logits.shape
    k = drafts.shape[1]
    rep = params.repetition_penalty[:, None, None]
    pres = params.presence_penalty[:, None, None]
    freq = params.frequency_penalty[:, None, None]
    base = penalized(logits, prompt_mask[:, None, :], counts[:, None, :], rep, pres, freq)
    if k:
        rows = jnp.arange(k1)[:, None]
        incl = jnp.arange(k)[None, :] < rows  # [K1, k]: d_{i+1} is before row j's token
        same = drafts[:, :, None] == drafts[:, None, :]  # [B, k, k]
        extra = jnp.einsum("bik,jk->bji", same.astype(jnp.int32), incl.astype(jnp.int32))
        d = jnp.clip(drafts, 0, v - 1)
        c = jnp.take_along_axis(counts, d, axis=1)[:, None, :] + extra  # [B, K1, k]
        m = jnp.take_along_axis(prompt_mask, d, axis=1)[:, None, :]
        raw = jnp.take_along_axis(logits, jnp.broadcast_to(d[:, None, :], (b, k1, k)), axis=2)
        val = penalized(raw, m, c, rep, pres, freq)
        col = jnp.where(incl[None], d[:, None, :], v)  # v: out of range, dropped
        bi = jnp.arange(b)[:, None, None]
        ji = jnp.arange(k1)[None, :, None]
        base = base.at[bi, ji, col].set(val, mode="drop")
    return jnp.where(penalize[:, None, None], base, logits)


def _kept(ok: jax.Array) -> jax.Array:
    """Leading run of True per row, [B, k] bool -> [B] int32."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


def _emit(drafts: jax.Array, accepted: jax.Array, last: jax.Array) -> jax.Array:
    """[B, k + 1]: the kept drafts, then `last` at index `accepted`, then -1."""
    b, k = drafts.shape
    j = jnp.arange(k + 1)[None, :]
    padded = jnp.concatenate([drafts, jnp.full((b, 1), -1, drafts.dtype)], axis=1)
    return jnp.where(j < accepted[:, None], padded,
                     jnp.where(j == accepted[:, None], last[:, None], -1)).astype(jnp.int32)


def _valid(proposal: Proposal) -> jax.Array:
    k = proposal.tokens.shape[1]
    return jnp.arange(k)[None, :] < proposal.num_tokens[:, None]


def greedy_verify(scored: jax.Array, proposal: Proposal) -> tuple[jax.Array, jax.Array]:
    """(accepted [B], tokens [B, K1]) for greedy rows; `scored` [B, K1, V]."""
    b, k1, v = scored.shape
    target = greedy_tokens(scored.reshape(b * k1, v)).reshape(b, k1)
    d = proposal.tokens
    a = _kept((d == target[:, :-1]) & _valid(proposal))
    last = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
    return a, _emit(d, a, last)


def _draft_probs_at(proposal: Proposal, idx: jax.Array, vocab: int) -> jax.Array:
    """q at draft index idx [B] (clipped to k - 1), [B, V]."""
    k = proposal.tokens.shape[1]
    i = jnp.clip(idx, 0, k - 1)
    if proposal.probs is None:
        tok = jnp.take_along_axis(proposal.tokens, i[:, None], axis=1)[:, 0]
        return jax.nn.one_hot(tok, vocab, dtype=jnp.float32)
    return jnp.take_along_axis(proposal.probs, i[:, None, None], axis=1)[:, 0]


def _accept_uniforms(keys: jax.Array, positions: jax.Array, k: int) -> jax.Array:
    """[B, k] uniforms in [0, 1): the accept decision about draft i of each row, keyed by the
    row's seed and the draft's position (positions [B] is the first draft's)."""
    b = keys.shape[0]
    pos = (positions[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]).reshape(-1)
    keyed = fold(jnp.repeat(keys, k, axis=0), pos, ACCEPT_SALT)
    return jax.vmap(lambda kk: jax.random.uniform(kk, ()))(keyed).reshape(b, k)


def _draw(keys: jax.Array, dist: jax.Array) -> jax.Array:
    """One token per row from unnormalized probabilities [B, V] with typed keys [B]."""
    logp = jnp.where(dist > 0, jnp.log(jnp.maximum(dist, 1e-30)), -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def rejection_verify(probs: jax.Array, proposal: Proposal, keys: jax.Array,
                     positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lossless speculative sampling. probs [B, K1, V]: the target's sampling distribution of
    each row; keys [B, 2] raw row keys; positions [B] = position of the first emitted token
    (P + 1). Returns (accepted [B], tokens [B, K1])."""
    b, k1, v = probs.shape
    k = k1 - 1
    d = jnp.clip(proposal.tokens, 0, v - 1)
    p_d = jnp.take_along_axis(probs[:, :k], d[:, :, None], axis=2)[:, :, 0]  # [B, k]
    if proposal.probs is None:
        q_d = jnp.ones_like(p_d)
    else:
        q_d = jnp.take_along_axis(proposal.probs, d[:, :, None], axis=2)[:, :, 0]
    u = _accept_uniforms(keys, positions, k)
    a = _kept((u * q_d < p_d) & _valid(proposal))
    p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]  # [B, V]
    rejected = a < proposal.num_tokens
    residual = jnp.maximum(p_a - _draft_probs_at(proposal, a, v), 0.0)
    use_res = rejected & (jnp.sum(residual, axis=1) > 0)
    dist = jnp.where(use_res[:, None], residual, p_a)
    last = _draw(fold(keys, positions + a, BONUS_SALT), dist)
    return a, _emit(proposal.tokens, a, last)


def coupled_verify(scored: jax.Array, params: SamplingParams, proposal: Proposal,
                   keys: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keep drafts while each equals the token plain decoding samples at its position (scored
    [B, K1, V]: penalized logits; keys [B, 2] raw row keys; positions [B] = position of the
    first emitted token). Returns (accepted [B], tokens [B, K1])."""
    b, k1, v = scored.shape
    rep = jax.tree.map(lambda x: jnp.repeat(x, k1, axis=0), params)
    pos = (positions[:, None] + jnp.arange(k1, dtype=jnp.int32)[None, :]).reshape(-1)
    target = sample(scored.reshape(b * k1, v), rep, jnp.repeat(keys, k1, axis=0), pos,
                    use_sampling=True).reshape(b, k1)
    d = proposal.tokens
    a = _kept((d == target[:, :-1]) & _valid(proposal))
    last = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
    return a, _emit(d, a, last)


def typical_verify(probs: jax.Array, proposal: Proposal, keys: jax.Array, positions: jax.Array,
                   *, threshold: float, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Medusa's typical acceptance (lossy): keep d while p(d) > min(threshold,
    alpha * exp(-entropy(p))), then sample the next token from p."""
    b, k1, v = probs.shape
    k = k1 - 1
    d = jnp.clip(proposal.tokens, 0, v - 1)
    p_d = jnp.take_along_axis(probs[:, :k], d[:, :, None], axis=2)[:, :, 0]
    ent = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0),
                   axis=2)[:, :k]
    a = _kept((p_d > jnp.minimum(threshold, alpha * jnp.exp(-ent))) & _valid(proposal))
    p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]
    last = _draw(fold(keys, positions + a, BONUS_SALT), p_a)
    return a, _emit(proposal.tokens, a, last)


def synthetic_verify(scored: jax.Array, proposal: Proposal, keys: jax.Array,
                     positions: jax.Array, *, rate: float | jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """Bench only: keep each valid draft with probability `rate`; emit the target's argmax of
    each row (row j's argmax for token j), so the step costs what a real one does."""
    b, k1, v = scored.shape
    k = k1 - 1
    u = _accept_uniforms(keys, positions, k)
    a = _kept((u < rate) & _valid(proposal))
    target = greedy_tokens(scored.reshape(b * k1, v)).reshape(b, k1)
    jj = jnp.arange(k1)[None, :]
    return a, jnp.where(jj <= a[:, None], target, -1).astype(jnp.int32)


def verify(logits: jax.Array, proposal: Proposal, *, params: SamplingParams | None,
           keys: jax.Array, positions: jax.Array, prompt_mask: jax.Array | None,
           counts: jax.Array | None, penalize: jax.Array | None, acceptance: str,
           full: bool, threshold: float = 0.09, alpha: float = 0.3,
           rate: float | jax.Array = 0.0) -> tuple[jax.Array, jax.Array]:
    """(accepted [B], tokens [B, K1]) for raw target logits [B, K1, V] f32.

    `full` is static: False (an all-greedy batch without penalties) compares argmaxes only;
    True scores every row with its penalties and sampling parameters and picks greedy or
    sampling verification per row."""
    if acceptance == "synthetic":
        return synthetic_verify(logits, proposal, keys, positions, rate=rate)
    if not full:
        return greedy_verify(logits, proposal)
    b, k1, v = logits.shape
    logits = whole_rows(logits.reshape(b * k1, v)).reshape(b, k1, v)
    scored = score_rows(logits, params, prompt_mask, counts, proposal.tokens, penalize)
    g_a, g_tok = greedy_verify(scored, proposal)
    if acceptance == "coupled":  # greedy rows are plain decoding's argmax there too
        return coupled_verify(scored, params, proposal, keys, positions)
    rep = jax.tree.map(lambda x: jnp.repeat(x, k1, axis=0), params)
    probs = sampling_probs(scored.reshape(b * k1, v), rep).reshape(b, k1, v)
    if acceptance == "typical":
        s_a, s_tok = typical_verify(probs, proposal, keys, positions, threshold=threshold,
                                    alpha=alpha)
    else:
        s_a, s_tok = rejection_verify(probs, proposal, keys, positions)
    sampling = params.temperature > 0
    return (jnp.where(sampling, s_a, g_a),
            jnp.where(sampling[:, None], s_tok, g_tok))
