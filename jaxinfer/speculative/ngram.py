"""N-gram prompt lookup (vLLM's `ngram` method, "prompt lookup decoding"), on device.

For each row, the longest suffix of its tokens (prompt + output) of `prompt_lookup_max` down to
`prompt_lookup_min` tokens that occurred earlier proposes the (up to) k tokens that followed its
latest earlier occurrence. Written through the research API: history in, one-hot drafts out.

It runs on the device, inside the speculative step: the host never has a row's latest tokens
when it dispatches the next step (they are read one step late), so a host-side lookup would
cost the one-step-ahead dispatch, a full device round trip per step. The lookup is B x H x n
integer compares (H = max_seq_len); `benchmarks/results/spec_*` has its measured cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.speculative.api import Proposal, ProposeInputs, Proposer, TargetInfo, history_window
from jaxinfer.speculative.config import SpeculativeConfig


def lookup(history: jax.Array, length: jax.Array, k: int, n_min: int, n_max: int
           ) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, k], count [B]) proposed from history [B, H] whose first `length` [B]
    tokens are known."""
    b, h = history.shape
    idx = jnp.arange(h, dtype=jnp.int32)[None, :]
    best_start = jnp.full((b,), -1, jnp.int32)  # where the proposed continuation starts
    for n in range(n_min, n_max + 1):  # longer matches override shorter ones
        suffix = history_window(history, length - n, n)  # [B, n]
        eq = (idx <= (length - n - 1)[:, None]) & (length >= n + 1)[:, None]
        for j in range(n):
            shifted = jnp.roll(history, -j, axis=1)  # shifted[i] = history[i + j]
            eq &= shifted == suffix[:, j: j + 1]
        last = jnp.max(jnp.where(eq, idx, -1), axis=1)  # latest occurrence
        best_start = jnp.where(last >= 0, last + n, best_start)
    found = best_start >= 0
    tokens = history_window(history, jnp.maximum(best_start, 0), k)
    count = jnp.where(found, jnp.clip(length - best_start, 0, k), 0)
    return tokens, count.astype(jnp.int32)


class NgramProposer(Proposer):
    name = "ngram"
    uses_history = True

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, params, state, inputs: ProposeInputs, k: int):
        tokens, count = lookup(inputs.history, inputs.positions + 1, k, self.n_min, self.n_max)
        return state, Proposal(tokens=tokens, num_tokens=jnp.where(inputs.active, count, 0))


def make(spec: SpeculativeConfig, target: TargetInfo) -> NgramProposer:
    return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
