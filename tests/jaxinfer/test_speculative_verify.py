"""The verifiers and the n-gram lookup as pure functions: hand-computed cases and the
distribution of speculative sampling against the exact target distribution."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinfer.engine import packing
from jaxinfer.errors import ConfigError
from jaxinfer.sampling import SamplingParams, apply_penalties
from jaxinfer.speculative.api import Proposal
from jaxinfer.speculative.config import parse_speculative_config
from jaxinfer.speculative.ngram import lookup
from jaxinfer.speculative.verify import (greedy_verify, rejection_verify, score_rows,
                                         typical_verify)


def _keys(n, seed=0):
    return jnp.asarray([packing.seed_key(seed + i) for i in range(n)], jnp.int32).view(
        jnp.uint32)


def _params(b, temperature=1.0, rep=1.0, pres=0.0, freq=0.0):
    f = lambda v, dt=jnp.float32: jnp.full((b,), v, dt)  # noqa: E731
    return SamplingParams(temperature=f(temperature), top_k=f(0, jnp.int32), top_p=f(1.0),
                          min_p=f(0.0), repetition_penalty=f(rep), presence_penalty=f(pres),
                          frequency_penalty=f(freq))


def test_greedy_keeps_drafts_up_to_the_first_mismatch_then_adds_the_targets_token():
    v = 6
    target = np.array([[2, 3, 1, 5], [4, 0, 0, 0], [1, 2, 3, 4]])  # argmax per verify row
    logits = jax.nn.one_hot(target, v) * 5.0
    drafts = jnp.asarray([[2, 3, 0], [1, 0, 0], [1, 2, 3]], jnp.int32)
    num = jnp.asarray([3, 3, 2], jnp.int32)  # row 2: only two drafts are real
    a, tok = greedy_verify(logits, Proposal(tokens=drafts, num_tokens=num))
    np.testing.assert_array_equal(a, [2, 0, 2])
    np.testing.assert_array_equal(tok, [[2, 3, 1, -1], [4, -1, -1, -1], [1, 2, 3, -1]])


def test_rejection_hand_cases():
    v = 4
    # Row 0: p(d) >= q(d) at every position: always kept, bonus from the last row (one-hot 3).
    # Row 1: p(d_1) = 0: always rejected; the residual max(p - q, 0) excludes d_1 = 0, and p
    #        puts its mass on {0, 2}: the token must be 2.
    # Row 2: deterministic drafts (q one-hot), p(d_1) = 1 then p(d_2) = 0: keep 1, then the
    #        residual of a one-hot q is p without d_2: token 1.
    p = np.zeros((3, 3, v), np.float32)
    p[0, 0] = [0.0, 1.0, 0.0, 0.0]
    p[0, 1] = [0.0, 0.0, 1.0, 0.0]
    p[0, 2] = [0.0, 0.0, 0.0, 1.0]
    p[1, 0] = [0.0, 0.0, 1.0, 0.0]
    p[1, 1:] = 0.25
    p[2, 0] = [0.0, 0.0, 1.0, 0.0]
    p[2, 1] = [0.0, 1.0, 0.0, 0.0]
    p[2, 2] = 0.25
    q = np.full((3, 2, v), 0.25, np.float32)
    drafts = jnp.asarray([[1, 2], [0, 1], [2, 3]], jnp.int32)
    num = jnp.asarray([2, 2, 2], jnp.int32)
    for seed in range(5):
        a, tok = rejection_verify(jnp.asarray(p[:2]), Proposal(drafts[:2], num[:2],
                                                                jnp.asarray(q[:2])),
                                  _keys(2, seed), jnp.asarray([10, 10]))
        np.testing.assert_array_equal(a, [2, 0])
        np.testing.assert_array_equal(tok, [[1, 2, 3], [2, -1, -1]])
        a, tok = rejection_verify(jnp.asarray(p[2:]), Proposal(drafts[2:], num[2:]),
                                  _keys(1, seed), jnp.asarray([10]))
        np.testing.assert_array_equal(a, [1])
        np.testing.assert_array_equal(tok, [[2, 1, -1]])


def _chain(table, prev, draw_keys):
    """Sample from a Markov table [V, V] (next | prev) for rows `prev` [N]."""
    return jax.vmap(lambda kk, pr: jax.random.categorical(kk, jnp.log(table[pr])))(
        draw_keys, prev).astype(jnp.int32)


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_follows_the_target_distribution(k):
    """A Markov target p(next | prev) and a different draft q: run many seeded rows through
    draft, verify and re-draft until each has 3 tokens, then test each output position,
    conditioned on the token before it, against p by chi-square (not pooled over
    positions)."""
    v, n, want = 4, 6000, 3
    rng = np.random.default_rng(0)
    p_tab = jnp.asarray(rng.dirichlet(np.ones(v) * 0.7, size=v), jnp.float32)
    q_tab = jnp.asarray(rng.dirichlet(np.ones(v) * 0.7, size=v), jnp.float32)
    keys = _keys(n, 123)
    out = np.full((n, want + k + 1), -1, np.int64)
    filled = np.zeros(n, np.int64)
    last = jnp.zeros((n,), jnp.int32)  # the prompt's last token: 0
    step = 0
    while filled.min() < want:
        step += 1
        drafts, probs, prev = [], [], last
        for i in range(k):
            dk = jax.random.split(jax.random.key(1000 * step + i), n)
            d = _chain(q_tab, prev, dk)
            drafts.append(d)
            probs.append(q_tab[prev])
            prev = d
        drafts = jnp.stack(drafts, 1)
        fed = jnp.concatenate([last[:, None], drafts], axis=1)
        target_p = p_tab[fed]  # [N, k + 1, V]
        pos = jnp.asarray(filled + 1000 * step, jnp.int32)  # a fresh position per decision
        a, tok = rejection_verify(target_p, Proposal(drafts, jnp.full((n,), k, jnp.int32),
                                                     jnp.stack(probs, 1)), keys, pos)
        tok, a = np.asarray(tok), np.asarray(a)
        live = filled < want  # rows done stay as they are
        for r in np.flatnonzero(live):
            m = a[r] + 1
            out[r, filled[r]: filled[r] + m] = tok[r, :m]
        filled = np.where(live, filled + a + 1, filled)
        last = jnp.asarray(out[np.arange(n), filled - 1], jnp.int32)
    seq = np.concatenate([np.zeros((n, 1), np.int64), out[:, :want]], axis=1)
    p_np = np.asarray(p_tab, np.float64)
    pvalues = []
    for pos_i, prev_tok in itertools.product(range(1, want + 1), range(v)):
        rows = seq[:, pos_i - 1] == prev_tok
        if rows.sum() < 200:
            continue
        counts = np.bincount(seq[rows, pos_i], minlength=v)
        expected = p_np[prev_tok] * rows.sum()
        keep = expected > 5
        obs = counts[keep]
        exp = expected[keep] * obs.sum() / expected[keep].sum()
        pvalues.append(stats.chisquare(obs, exp).pvalue)
    assert len(pvalues) >= 6
    # Independent tests at the 0.1% level each (Bonferroni over all of them).
    assert min(pvalues) > 1e-3 / len(pvalues), pvalues


def test_typical_acceptance_keeps_likely_drafts_only():
    v = 4
    p = np.zeros((2, 2, v), np.float32)
    p[:, 0] = [0.7, 0.1, 0.1, 0.1]
    p[:, 1] = [0.25, 0.25, 0.25, 0.25]
    drafts = jnp.asarray([[0], [1]], jnp.int32)  # 0.7 passes, 0.1 does not at eps 0.3
    a, tok = typical_verify(jnp.asarray(p), Proposal(drafts, jnp.asarray([1, 1], jnp.int32)),
                            _keys(2), jnp.asarray([5, 5]), threshold=0.3, alpha=0.9)
    np.testing.assert_array_equal(a, [1, 0])
    assert tok[0, 0] == 0 and tok[0, 1] >= 0 and tok[1, 0] >= 0 and tok[1, 1] == -1


def test_penalties_of_each_verify_row_count_the_drafts_before_it():
    """score_rows equals apply_penalties with the counts plain decoding would have had."""
    b, v, k = 2, 7, 3
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(b, k + 1, v)), jnp.float32)
    mask = jnp.asarray(rng.random((b, v)) < 0.3)
    counts = jnp.asarray(rng.integers(0, 3, (b, v)), jnp.int32)
    drafts = jnp.asarray([[2, 2, 5], [1, 3, 1]], jnp.int32)
    params = _params(b, rep=1.3, pres=0.4, freq=0.2)
    got = score_rows(logits, params, mask, counts, drafts, jnp.asarray([True, True]))
    for j in range(k + 1):
        c = np.asarray(counts).copy()
        for r in range(b):
            for i in range(j):
                c[r, int(drafts[r, i])] += 1
        want = apply_penalties(logits[:, j], params, mask, jnp.asarray(c))
        np.testing.assert_allclose(got[:, j], want, rtol=1e-6)


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match():
    hist = np.zeros((3, 16), np.int32)
    hist[0, :9] = [5, 6, 7, 8, 1, 5, 6, 7, 9]  # suffix "7 9": no match; "9": none
    hist[1, :9] = [5, 6, 7, 8, 1, 2, 5, 6, 7]  # suffix "5 6 7" -> 8 1 2
    hist[2, :7] = [4, 4, 4, 4, 4, 4, 4]  # latest match of "4 4 4" ends one before the end
    tok, count = lookup(jnp.asarray(hist), jnp.asarray([9, 9, 7]), 3, 1, 3)
    np.testing.assert_array_equal(count, [0, 3, 1])
    np.testing.assert_array_equal(tok[1], [8, 1, 2])
    assert int(tok[2, 0]) == 4


@pytest.mark.parametrize("text, needle", [
    ('{"method": "eagle", "num_speculative_tokens": 3}', "unknown method"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "must be in [1, 7]"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}', "unknown key"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', 'needs "model"'),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, '
     '"prompt_lookup_max": 2}', "prompt_lookup_min"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_configs_are_one_line_errors(text, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_speculative_config(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_missing_draft_model_is_a_config_error():
    from jaxinfer.speculative.draft_model import make

    spec = parse_speculative_config(
        '{"method": "draft_model", "model": "/no/such", "num_speculative_tokens": 2}')
    with pytest.raises(ConfigError, match="draft model '/no/such' is not a directory"):
        make(spec, None)


def test_a_plugin_that_cannot_be_loaded_is_a_config_error():
    from jaxinfer.speculative.api import load_factory

    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.mod'"):
        load_factory("no_such_pkg.mod:make")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        load_factory("jaxinfer.speculative.ngram:nope")
