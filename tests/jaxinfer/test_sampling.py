import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine import packing
from jaxinfer.engine.request import Limits, Request, SamplingOptions, validate_request
from jaxinfer.errors import RequestError
from jaxinfer.sampling import SamplingParams, greedy_tokens, sample


def _params(b, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0) -> SamplingParams:
    """Per-row parameters [b] (scalars or length-b sequences), as the device unpacks them."""
    def col(x, dtype):
        return jnp.asarray(np.broadcast_to(np.asarray(x, dtype), (b,)).copy())
    return SamplingParams(temperature=col(temperature, np.float32), top_k=col(top_k, np.int32),
                          top_p=col(top_p, np.float32), min_p=col(min_p, np.float32),
                          repetition_penalty=col(repetition_penalty, np.float32),
                          presence_penalty=col(presence_penalty, np.float32),
                          frequency_penalty=col(frequency_penalty, np.float32))


def row_keys(seeds) -> np.ndarray:
    """Raw uint32 keys [B, 2] of integer seeds, as `packing.seed_key` packs them."""
    return np.array([packing.seed_key(s) for s in seeds], np.int32).view(np.uint32)


def _draw(logits, n=2000, **kw):
    b = n
    params = _params(b, **kw)
    lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (b, len(logits)))
    toks = sample(lg, params, jnp.asarray(row_keys(np.arange(b))), jnp.zeros(b, jnp.int32),
                  use_sampling=True)
    return np.bincount(np.asarray(toks), minlength=len(logits)) / b


LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))


def test_greedy_rows_are_argmax():
    lg = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    p = _params(4, temperature=[0.0, 0.0, 1.0, 0.0])
    toks = np.asarray(sample(lg, p, jnp.asarray(row_keys(range(4))), jnp.zeros(4, jnp.int32),
                             use_sampling=True))
    want = np.asarray(jnp.argmax(lg, -1))
    assert toks[[0, 1, 3]].tolist() == want[[0, 1, 3]].tolist()


def test_temperature_one_matches_distribution():
    freq = _draw(LOGITS, temperature=1.0)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.04)


def test_top_k_top_p_min_p_filters():
    assert set(np.nonzero(_draw(LOGITS, temperature=1.0, top_k=2))[0]) == {0, 1}
    # top_p 0.7: 0.5 + 0.25 reaches it, so tokens 0 and 1 only
    assert set(np.nonzero(_draw(LOGITS, temperature=1.0, top_p=0.7))[0]) == {0, 1}
    # min_p 0.2: keep p >= 0.1 -> tokens 0, 1, 2
    assert set(np.nonzero(_draw(LOGITS, temperature=1.0, min_p=0.2))[0]) == {0, 1, 2}


def test_same_seed_same_position_same_token_independent_of_batch():
    rng = np.random.default_rng(3)
    lg = rng.standard_normal((3, 100)).astype(np.float32)
    p3 = _params(3, temperature=1.0)
    keys = row_keys([11, 12, 13])
    pos = jnp.array([5, 6, 7])
    batch = np.asarray(sample(jnp.asarray(lg), p3, jnp.asarray(keys), pos, use_sampling=True))
    alone = np.asarray(sample(jnp.asarray(lg[1:2]), _params(1, temperature=1.0),
                              jnp.asarray(keys[1:2]), pos[1:2], use_sampling=True))
    assert batch[1] == alone[0]


LIMITS = Limits(vocab_size=50, max_seq_len=64, max_tokens=63, max_n=2, max_logprobs=2,
                max_stop_token_ids=4)


def _check(**kw):
    validate_request(Request(request_id="r", prompt_ids=[1], max_tokens=4,
                             sampling=SamplingOptions(**kw)), LIMITS)


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("nan")),
                                dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(min_p=2.0)])
def test_bad_values_raise(kw):
    with pytest.raises(RequestError, match=next(iter(kw))):
        _check(**kw)


# -- penalties, logprobs, counting ---------------------------------------------------------------

def _penalties_ref(logits, rep, pres, freq, prompt_mask, counts):
    """Plain numpy, row by row, element by element: vLLM's order and rules."""
    out = logits.astype(np.float64).copy()
    for b in range(out.shape[0]):
        for v in range(out.shape[1]):
            if prompt_mask[b, v] or counts[b, v] > 0:
                out[b, v] = out[b, v] / rep[b] if out[b, v] > 0 else out[b, v] * rep[b]
            out[b, v] -= freq[b] * counts[b, v]
            out[b, v] -= pres[b] * (counts[b, v] > 0)
    return out


def test_apply_penalties_matches_reference():
    from jaxinfer.sampling import apply_penalties
    rng = np.random.default_rng(0)
    b, v = 4, 37
    logits = rng.standard_normal((b, v)).astype(np.float32) * 3
    prompt_mask = rng.random((b, v)) < 0.3
    counts = (rng.integers(0, 4, (b, v)) * (rng.random((b, v)) < 0.3)).astype(np.int32)
    rep, pres, freq = [1.3, 0.7, 1.0, 2.0], [0.5, -0.5, 0.0, 2.0], [0.25, 0.0, -1.0, 1.5]
    p = _params(b, repetition_penalty=rep, presence_penalty=pres,
                            frequency_penalty=freq)
    got = np.asarray(apply_penalties(jnp.asarray(logits), p, jnp.asarray(prompt_mask),
                                     jnp.asarray(counts)))
    want = _penalties_ref(logits, rep, pres, freq, prompt_mask, counts)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # row 2 has only a frequency penalty: prompt-only tokens must stay exactly as they were
    only_prompt = prompt_mask[2] & (counts[2] == 0)
    assert only_prompt.any()
    np.testing.assert_array_equal(got[2, only_prompt], logits[2, only_prompt])


def test_penalties_off_is_identity():
    from jaxinfer.sampling import apply_penalties
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 11)).astype(np.float32)
    p = _params(3)
    out = apply_penalties(jnp.asarray(logits), p, jnp.ones((3, 11), bool),
                          jnp.full((3, 11), 2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(out), logits)
    floats, ints = packing.sampling_row()
    assert not packing.is_penalized(floats) and not packing.needs_full_sampler(floats, ints)
    assert packing.is_penalized(packing.sampling_row(presence_penalty=0.1)[0])
    assert packing.needs_full_sampler(*packing.sampling_row(logprobs=1))
    assert packing.needs_full_sampler(*packing.sampling_row(temperature=0.5))


def test_repetition_penalty_changes_greedy_choice():
    from jaxinfer.sampling import apply_penalties
    logits = jnp.asarray([[2.0, 1.9, -1.0], [2.0, 1.9, -1.0]])
    counts = jnp.asarray([[1, 0, 0], [1, 0, 0]], jnp.int32)
    p = _params(2, repetition_penalty=[1.2, 1.0])
    pen = apply_penalties(logits, p, jnp.zeros((2, 3), bool), counts)
    toks = sample(pen, p, jnp.asarray(row_keys([0, 1])), jnp.zeros(2, jnp.int32),
                  use_sampling=False)
    assert np.asarray(toks).tolist() == [1, 0]


def test_token_logprobs_match_numpy():
    from jaxinfer.sampling import token_logprobs
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 20)).astype(np.float32) * 4
    tokens = np.array([5, 0, 19], np.int32)
    lp, ids, top = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), 4)
    x = logits.astype(np.float64)
    ref = x - x.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lp), ref[np.arange(3), tokens], rtol=1e-5, atol=1e-5)
    want_ids = np.argsort(-ref, axis=-1)[:, :4]
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(top), np.take_along_axis(ref, want_ids, -1),
                               rtol=1e-5, atol=1e-5)
    assert ids.dtype == jnp.int32 and lp.shape == (3,)
    lp0, ids0, top0 = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), 0)
    assert ids0.shape == (3, 0) and top0.shape == (3, 0)
    np.testing.assert_allclose(np.asarray(lp0), np.asarray(lp))
    with pytest.raises(ValueError):
        token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), 21)


def test_filters_per_row_and_greedy_rows_unaffected():
    # One batch mixing every filter; each row must draw only from its own allowed set,
    # and greedy rows with hostile filter settings must still return the argmax.
    n = 400
    rows = [dict(temperature=1.0, top_k=2), dict(temperature=1.0, top_p=0.7),
            dict(temperature=1.0, min_p=0.2), dict(temperature=0.0),
            dict(temperature=1.0), dict(temperature=0.0, top_k=3, top_p=0.9)]
    allowed = [{0, 1}, {0, 1}, {0, 1, 2}, {0}, None, {0}]
    b = len(rows) * n
    cols = {k: [r.get(k, d) for r in rows for _ in range(n)]
            for k, d in dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0).items()}
    params = _params(b, **cols)
    lg = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (b, len(LOGITS)))
    toks = np.asarray(sample(lg, params, jnp.asarray(row_keys(np.arange(b))),
                             jnp.zeros(b, jnp.int32), use_sampling=True)).reshape(len(rows), n)
    for i, want in enumerate(allowed):
        if want is not None:
            assert set(toks[i].tolist()) == want, (i, rows[i])
    assert len(set(toks[4].tolist())) >= 4  # the unfiltered row really samples


@pytest.mark.parametrize("kw", [dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
                                dict(repetition_penalty=float("inf")),
                                dict(presence_penalty=2.5), dict(presence_penalty=float("nan")),
                                dict(frequency_penalty=-3.0), dict(seed=-1)])
def test_bad_penalties_raise(kw):
    with pytest.raises(RequestError, match=next(iter(kw))):
        _check(**kw)


def test_neutral_values_pass():
    _check(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
           presence_penalty=-2, frequency_penalty=2, seed=0)


def test_greedy_tokens_is_argmax_first_of_ties():
    """The two-reduction argmax (partitions as all-reduces under tp) picks what jnp.argmax
    picks, including the first index among equal maxima; a NaN row stays in range."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    logits[1, [3, 17, 40]] = 9.0  # a three-way tie: the first wins
    logits[2] = 0.0  # all equal
    logits[3, 49] = 99.0  # the last index
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got[1] == 3 and got[2] == 0 and got[3] == 49
    logits[4, 7] = np.nan
    nan_row = int(jax.jit(greedy_tokens)(jnp.asarray(logits))[4])
    assert 0 <= nan_row < 50
