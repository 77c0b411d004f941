"""Bench only: a proposer of controlled acceptance (vLLM's synthetic rejection mode).

It drafts k copies of the last token and the `"synthetic"` verifier keeps each with probability
`acceptance_rate` whatever the target says, emitting the target's argmax tokens: every step
costs exactly what a real k-token speculative step costs, so the speed against acceptance can be
measured on models no real draft exists for. The text it writes is not the model's.

The rate is the proposer's one parameter (a device scalar the programs take as an operand, not
a constant compiled into them), so `jaxinfer.bench --acceptance-rates` sweeps it on the same
compiled programs."""

from __future__ import annotations

import jax.numpy as jnp

from jaxinfer.speculative.api import Proposal, ProposeInputs, Proposer, TargetInfo
from jaxinfer.speculative.config import SpeculativeConfig


class SyntheticProposer(Proposer):
    name = "synthetic"

    def __init__(self, acceptance_rate: float) -> None:
        self.acceptance_rate = acceptance_rate

    def params(self):
        return {"acceptance_rate": jnp.asarray(self.acceptance_rate, jnp.float32)}

    def propose(self, params, state, inputs: ProposeInputs, k: int):
        tokens = jnp.repeat(inputs.tokens[:, None], k, axis=1)
        return state, Proposal(tokens=tokens,
                               num_tokens=jnp.where(inputs.active, k, 0).astype(jnp.int32))


def make(spec: SpeculativeConfig, target: TargetInfo) -> SyntheticProposer:
    return SyntheticProposer(float(spec.acceptance_rate))
