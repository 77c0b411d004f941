"""A speculative-decoding plug-in in one file: "period" drafting.

Small models under greedy decoding fall into loops (a docstring, a `return` line, again and
again). If a row's last 2p tokens are one block of p tokens twice (p = 1..max_period), draft the
next k tokens by continuing that period. Unlike n-gram lookup, which can only copy tokens that
already followed an earlier match, this extrapolates: it drafts k tokens even when the loop has
just closed. Run it with

    PYTHONPATH=docs/examples python -m jaxinfer.generate --prompt "def fibonacci(n):" \
        --max-new-tokens 96 --json \
        --speculative-config '{"method": "period_proposer:make", "num_speculative_tokens": 4}'

(docs/decoding.md has its measured acceptance). Everything here is a pure function of device
arrays with static configuration, traced into the engine's own speculative program.
"""

import jax.numpy as jnp

from jaxinfer.speculative.api import Proposal, ProposeInputs, Proposer, history_window


class PeriodProposer(Proposer):
    name = "period"
    uses_history = True  # the engine keeps each slot's tokens on device for us

    def __init__(self, max_period: int) -> None:
        self.max_period = max_period  # static: read at trace time

    def propose(self, params, state, inputs: ProposeInputs, k: int):
        length = inputs.positions + 1  # tokens known per row (the last one included)
        hist = inputs.history
        best = jnp.zeros_like(length)  # the shortest period found (0: none)
        for p in range(self.max_period, 0, -1):  # shorter periods override longer ones
            last = history_window(hist, length - p, p)
            before = history_window(hist, length - 2 * p, p)
            ok = jnp.all(last == before, axis=1) & (length >= 2 * p)
            best = jnp.where(ok, p, best)
        i = jnp.arange(k)[None, :]
        period = jnp.maximum(best, 1)[:, None]
        idx = length[:, None] - period + i % period  # continue the block cyclically
        tokens = jnp.take_along_axis(hist, jnp.clip(idx, 0, hist.shape[1] - 1), axis=1)
        count = jnp.where(inputs.active & (best > 0), k, 0)
        return state, Proposal(tokens=tokens.astype(jnp.int32), num_tokens=count.astype(jnp.int32))


def make(spec, target):
    """The factory `--speculative-config` names: `spec` is the parsed config (its own keys in
    `spec.extra`), `target` the model, engine and mesh (jaxinfer.speculative.api.TargetInfo)."""
    return PeriodProposer(int(dict(spec.extra).get("max_period", 8)))
