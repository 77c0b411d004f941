"""Adaptive speculative depth: which compiled tier k a step runs (k = 0 is plain decoding).

The scheduler asks `SpecPlan.choose(rows)` once per step; every decode row of the step then
runs that tier. A tier is rated by expected tokens per second: the tokens the rows' acceptance
estimates predict (`expected_tokens`) over the tier's measured step cost at the step's batch
bucket (timed at warm-up, corrected by served steps in `observe`).

Acceptance is estimated at two levels (H200 runs, docs/decoding.md, found the per-row-only
estimate too slow to learn: each new sequence started at an optimistic 0.8 with five
pseudo-drafts of weight, and at acceptance 0.5 a batch of 32 ran several unprofitable k = 7
steps per sequence, 0.90x plain):

- an engine-wide *pool* of the decayed draft outcomes of every row's speculative steps. It
  starts optimistic (`POOL_PRIOR`, 0.8), so an engine tries speculating, and one step of a full
  batch then outweighs the prior;
- a row's own decayed outcomes, shrunk toward the pool with `ROW_PRIOR_WEIGHT` pseudo-drafts.
  A new sequence starts at the pool's value, so it inherits what the engine has learned about
  the current traffic instead of re-learning it.

While rows decode plainly they learn nothing, so their own evidence fades (`RELAX` per plain
dispatch) and the pool drifts back toward its optimistic prior: an engine that stopped
speculating tries one step again after a hundred or so plain dispatches (acceptance changes
along a text and with the traffic), which costs little.

Outcomes are counted as (kept, rejected): kept draft tokens, and 1 when a step rejected one.
For independent acceptance alpha, kept / (kept + rejected) estimates alpha (the geometric
likelihood's maximum).
"""

from __future__ import annotations

import dataclasses

POOL_PRIOR = (4.0, 1.0)  # (kept, rejected) the pool starts from and drifts back to: 0.8
POOL_DECAY = 0.8  # weight of the pool's history at each speculative step
ROW_PRIOR_WEIGHT = 2.0  # pseudo-outcomes of the pool in a row's estimate
ROW_DECAY = 0.9  # weight of a row's history at each speculative step it runs
RELAX = 0.97  # per plain dispatch: weight kept of a row's evidence and of the pool's history
SPEC_MARGIN = 1.03  # a speculative tier must promise this much more than plain decoding
COST_EMA = 0.2  # weight of each measured step in a tier's running cost


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a speculative step of depth k emits per row when each draft is kept with
    probability alpha independently of the others: 1 + alpha + ... + alpha^k."""
    if k == 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclasses.dataclass
class SpecPlan:
    """Speculative decoding as the scheduler sees it: the compiled tiers, and for adaptive
    depth each tier's measured step seconds by decode batch bucket ({(k, B): s}; k = 0 is a
    plain decode dispatch of `plain_steps` tokens per row) and the engine-wide acceptance
    pool."""

    tiers: tuple[int, ...]  # compiled speculative depths (0 = plain decode) ascending
    adaptive: bool = False
    costs: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
    plain_steps: int = 1  # tokens per row of the plain decode dispatch costs[(0, B)] timed
    catch_up: int | None = None  # the proposer's (`Proposer.catch_up`): rows this far behind
    pool_kept: float = POOL_PRIOR[0]
    pool_rejected: float = POOL_PRIOR[1]

    @property
    def max_k(self) -> int:
        return self.tiers[-1]

    # -- acceptance ----------------------------------------------------------------------
    @property
    def pool_acceptance(self) -> float:
        return self.pool_kept / (self.pool_kept + self.pool_rejected)

    def acceptance(self, kept: float, rejected: float) -> float:
        """A row's estimate from its own decayed outcomes, shrunk toward the pool."""
        w = ROW_PRIOR_WEIGHT
        return (kept + w * self.pool_acceptance) / (kept + rejected + w)

    def record(self, outcomes: list[tuple[int, int]]) -> None:
        """Fold one speculative step's (proposed, kept) per row into the pool (rows that
        proposed nothing say nothing)."""
        kept = sum(k for p, k in outcomes if p > 0)
        rejected = sum(p > k for p, k in outcomes if p > 0)
        if kept or rejected:
            self.pool_kept = POOL_DECAY * self.pool_kept + kept
            self.pool_rejected = POOL_DECAY * self.pool_rejected + rejected

    def relax(self) -> None:
        """A plain decode dispatch: the pool drifts toward its optimistic prior."""
        self.pool_kept = RELAX * self.pool_kept + (1 - RELAX) * POOL_PRIOR[0]
        self.pool_rejected = RELAX * self.pool_rejected + (1 - RELAX) * POOL_PRIOR[1]

    # -- costs ---------------------------------------------------------------------------
    def observe(self, k: int, batch: int, seconds: float) -> None:
        """Fold a served step's measured seconds into tier k's cost at `batch`. Warm-up times
        tiers on padding rows (no KV read, no host work), which under-counts real steps
        unevenly across tiers (the 1B shape at batch 32 chose k = 1 at 0.5 acceptance and ran
        at 0.77x plain); served steps correct it."""
        key = (k, batch)
        old = self.costs.get(key)
        self.costs[key] = seconds if old is None else (1 - COST_EMA) * old + COST_EMA * seconds

    # -- the choice ----------------------------------------------------------------------
    def rates(self, rows: list[tuple[float, int]], batch: int) -> dict[int, float]:
        """Expected tokens per second of each timed tier at decode bucket `batch` for rows of
        (acceptance estimate, draft lag: tokens its proposer's cache is behind). A row too far
        behind drafts nothing (it catches up) and counts one token. Plain decoding is rated
        per token of its timed multi-step dispatch (a one-token step beside prefill chunks
        costs it somewhat more per token)."""
        out = {}
        limit = self.catch_up
        for k in self.tiers:
            cost = self.costs.get((k, batch))
            if cost is None or cost <= 0:
                continue
            tokens = (len(rows) * self.plain_steps if k == 0 else sum(
                expected_tokens(a, k) if limit is None or lag < limit else 1.0
                for a, lag in rows))
            out[k] = tokens / cost
        return out

    def choose(self, rows: list[tuple[float, int]], batch: int) -> int:
        """The tier with the most expected tokens per second (`rates`); a speculative tier
        must beat plain decoding by SPEC_MARGIN (costs are measured, so noisy, and near
        break-even a wrong guess only loses)."""
        rates = self.rates(rows, batch)
        if not rates:
            return self.tiers[0]
        plain = rates.get(0)
        return max(rates, key=lambda k: rates[k] / (SPEC_MARGIN if k and plain else 1.0))
