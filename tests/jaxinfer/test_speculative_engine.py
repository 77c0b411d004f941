"""Speculative decoding in the engine, on the trained models of ../shared/models (target
stories260K, draft llama2xs-281K: one tok512 vocabulary): greedy output with speculation equals
greedy output without it, token for token, for every proposer; a self-draft keeps every draft;
stops, max_tokens, penalties, logprobs, seeds and preemption stay exact; adaptive tiers never
recompile."""

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine.llm import LLM
from jaxinfer.engine.request import SamplingOptions
from jaxinfer.model_loader import load_model
from sharding.mesh import make_mesh

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
TARGET, DRAFT = MODELS / "stories260K-hf", MODELS / "llama2xs-281K-hf"
PROMPTS = ["Once upon a time, there was a little girl", "The cat sat on the mat. The cat",
           "Tom and Sue went to the park", "One day"]
MAX_TOKENS = [37, 40, 29, 33]

pytestmark = pytest.mark.skipif(not (TARGET / "config.json").exists()
                                or not (DRAFT / "config.json").exists(),
                                reason=f"{MODELS} not present")


def _llm(spec: str | None, *, num_pages: int = 64, model: str = str(TARGET)) -> LLM:
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    loaded = load_model(model, mesh=mesh, dtype="float32")
    engine = EngineConfig(page_size=16, num_pages=num_pages, max_seq_len=128, dtype="float32",
                          prefill_buckets=(16,), prefill_rows=(4,), batch_buckets=(4,),
                          max_num_batched_tokens=64, decode_steps=1, max_logprobs=2,
                          speculative_config=spec)
    llm = LLM.from_loaded(loaded, engine, mesh=mesh)
    llm.core.warmup(max_workers=4)
    return llm


def _requests(llm: LLM, stop_ids=(), **kw):
    tok = llm.tokenizer
    out = []
    for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        extra = dict(kw)
        if i == 1:  # penalties and logprobs ride the full verifier (greedy rows)
            extra.update(sampling=SamplingOptions(repetition_penalty=1.3), logprobs=2)
        out.append(llm.request(tok.encode(p), max_tokens=n,
                               stop_token_ids=stop_ids if i == 2 else (), **extra))
    return out


def _tokens(results):
    return [[s.token_ids for s in r] for r in results]


@pytest.fixture(scope="module")
def plain():
    llm = _llm(None)
    first = llm.generate(_requests(llm))
    # A stop id that greedy reaches mid-output in prompt 2 (inside an accepted run, if any).
    stop = first[2][0].token_ids[len(first[2][0].token_ids) // 2]
    return llm, first, stop, llm.generate(_requests(llm, stop_ids=(stop,)))


# (ngram runs in the adaptive test below)
PROPOSERS = {
    "draft_model": f'{{"method": "draft_model", "model": "{DRAFT}", '
                   '"num_speculative_tokens": 3}',
    "layer_skip": '{"method": "layer_skip", "num_layers": 2, "num_speculative_tokens": 2}',
}


@pytest.fixture(scope="module")
def draft_llm():
    # 10 pages of 16 tokens for four sequences of up to ~50: some must be recomputed, so the
    # draft-model run below also checks that preemption during speculation stays exact. It
    # verifies by coupling with adaptive depth, so seeded sampling must equal plain decoding
    # token for token (test_coupled_...); fixed costs (not the CPU's timings, which would make
    # the choice of depth vary from run to run) make it speculate at depth 1 or 3 by acceptance.
    llm = _llm(PROPOSERS["draft_model"][:-1] + ', "acceptance": "coupled", "adaptive": true, '
               '"tiers": [0, 1, 3]}', num_pages=10)
    plan = llm.core.scheduler.spec
    plan.costs = {(0, 4): 0.3, (1, 4): 0.35, (3, 4): 0.45}
    plan.observe = lambda *a: None
    return llm


@pytest.fixture(scope="module")
def self_llm():
    return _llm(f'{{"method": "draft_model", "model": "{TARGET}", "num_speculative_tokens": 4}}')


# layer_skip's greedy equality on HF configs is in test_hf_parity (the gate)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "layer_skip"
                                  else n for n in sorted(PROPOSERS)])
def test_greedy_with_speculation_equals_greedy_without(plain, draft_llm, name):
    _, base, stop, base_stop = plain
    llm = draft_llm if name == "draft_model" else _llm(PROPOSERS[name])
    got = llm.generate(_requests(llm))
    assert _tokens(got) == _tokens(base)
    assert [r[0].finish_reason for r in got] == [r[0].finish_reason for r in base]
    lp_base = [(t.token_id, t.logprob) for t in base[1][0].logprobs]
    lp_got = [(t.token_id, t.logprob) for t in got[1][0].logprobs]
    assert [t for t, _ in lp_got] == [t for t, _ in lp_base]
    np.testing.assert_allclose([v for _, v in lp_got], [v for _, v in lp_base], atol=1e-4)
    if name == "draft_model":  # a stop id inside an accepted run (one proposer: CPU time)
        got_stop = llm.generate(_requests(llm, stop_ids=(stop,)))
        assert _tokens(got_stop) == _tokens(base_stop)
        assert got_stop[2][0].finish_reason == "stop"
    counts = llm.core.spec_counts
    assert counts["num_draft_tokens"] > 0
    assert 0 < counts["num_accepted_tokens"] <= counts["num_draft_tokens"]
    spec = got[0][0].speculative
    assert spec is not None and spec["num_draft_tokens"] >= spec["num_accepted_tokens"]
    assert llm.core.scheduler.kv.num_used == 0
    if name == "draft_model":
        assert llm.core.scheduler.num_preemptions > 0


def test_self_draft_keeps_every_draft(plain, self_llm):
    _, base, _, _ = plain
    llm = self_llm
    got = llm.generate(_requests(llm)[::2])  # no penalties: the draft proposes without them
    assert _tokens(got) == _tokens(base[::2])
    c = llm.core.spec_counts
    assert c["num_draft_tokens"] > 0 and c["num_accepted_tokens"] == c["num_draft_tokens"]
    # Every step kept its first draft; near max_tokens a row drafts fewer than 4.
    assert c["accepted_per_pos"][0] == c["num_drafts"]
    assert sum(c["accepted_per_pos"]) == c["num_accepted_tokens"]


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(self_llm):
    """Fixed k, pages for everyone (docs/decoding.md: adaptive depth and preemption change
    which steps sample a row's tokens)."""
    llm = self_llm
    tok = llm.tokenizer
    s = SamplingOptions(temperature=0.9, top_p=0.95, seed=7)
    req = lambda: llm.request(tok.encode(PROMPTS[0]), max_tokens=30, sampling=s)  # noqa: E731
    alone = llm.generate([req()])[0][0].token_ids
    mates = [llm.request(tok.encode(p), max_tokens=30,
                         sampling=SamplingOptions(temperature=1.0, seed=i))
             for i, p in enumerate(PROMPTS[1:])]
    together = llm.generate([*mates, req()])[-1][0].token_ids
    assert alone == together
    assert llm.generate([req()])[0][0].token_ids == alone
    assert llm.core.spec_counts["num_accepted_tokens"] > 0


def test_coupled_sampling_equals_plain_seeded_decoding(plain, draft_llm):
    """Coupled verification: seeded sampling rows equal plain decoding's token for token,
    although depth changes from step to step and sequences are preempted."""
    llm0, llm = plain[0], draft_llm
    tok = llm.tokenizer

    def requests(engine):
        return [engine.request(tok.encode(p), max_tokens=n, sampling=SamplingOptions(
            temperature=0.8, top_k=40 if i % 2 else 0, top_p=0.95, seed=11 + i,
            presence_penalty=0.5 if i == 3 else 0.0))
            for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))]

    before = dict(llm.core.spec_counts)
    preempted = llm.core.scheduler.num_preemptions
    assert _tokens(llm.generate(requests(llm))) == _tokens(llm0.generate(requests(llm0)))
    assert llm.core.spec_counts["num_accepted_tokens"] > before["num_accepted_tokens"]
    assert llm.core.scheduler.num_preemptions > preempted


def test_adaptive_tiers_switch_depth_without_recompiling(plain):
    _, base, _, _ = plain
    llm = _llm('{"method": "ngram", "num_speculative_tokens": 3, "adaptive": true, '
               '"tiers": [0, 1, 3]}')
    # Offline generation times the tiers itself when nobody did (the server's warm-up does).
    plan = llm.core.scheduler.spec
    plan.costs = {}
    llm.generate([llm.request(llm.tokenizer.encode(PROMPTS[3]), max_tokens=2)])
    assert sorted(plan.costs) == [(0, 4), (1, 4), (3, 4)] and min(plan.costs.values()) > 0
    # Costs that make the choice depend on each row's acceptance (plain: 1 token for 0.5;
    # k = 1 is 1.5 expected tokens for 0.7 at the prior, k = 3 wins once drafts are kept,
    # plain once they are not).
    llm.core.scheduler.spec.costs = {(0, 4): 0.5, (1, 4): 0.7, (3, 4): 0.9}
    chosen = []
    step = llm.core.step

    def counting_step():
        outs, stats = step()
        chosen.append(stats.num_steps)
        return outs, stats

    llm.core.step = counting_step
    compiles = llm.num_compiles
    got = llm.generate(_requests(llm))
    assert llm.num_compiles == compiles
    assert llm.core.num_recompiles == 0
    assert _tokens(got) == _tokens(base)
    assert len(set(chosen) - {0}) >= 2  # more than one depth (1 + k tokens) was chosen
    assert llm.core.spec_counts["num_accepted_tokens"] > 0  # the n-gram drafts were used


def test_docs_plugin_runs_through_the_research_api(monkeypatch):
    """docs/examples/period_proposer.py, named as package.module:factory, in the engine, on
    the bundled demo model (whose greedy loops it drafts)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "docs" / "examples"))
    outs = []
    for spec in (None, '{"method": "period_proposer:make", "num_speculative_tokens": 3}'):
        llm = _llm(spec, model="demo")
        prompts = ["def fibonacci(n):", "class Stack:", "import os", "    for i in range("]
        outs.append(_tokens(llm.generate([llm.request(llm.tokenizer.encode(p), max_tokens=60)
                                          for p in prompts])))
    assert outs[0] == outs[1]
    assert llm.core.spec_counts["num_accepted_tokens"] > 0
