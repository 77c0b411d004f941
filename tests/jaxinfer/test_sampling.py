import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import RequestError
from jaxinfer.sampling import SamplingParams, row_keys, sample


def _draw(logits, n=2000, **kw):
    b = n
    params = SamplingParams.make(b, **kw)
    lg = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (b, len(logits)))
    toks = sample(lg, params, jnp.asarray(row_keys(np.arange(b))), jnp.zeros(b, jnp.int32),
                  use_sampling=True)
    return np.bincount(np.asarray(toks), minlength=len(logits)) / b


LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))


def test_greedy_rows_are_argmax():
    lg = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    p = SamplingParams.make(4, temperature=[0.0, 0.0, 1.0, 0.0])
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
    p3 = SamplingParams.make(3, temperature=1.0)
    keys = row_keys([11, 12, 13])
    pos = jnp.array([5, 6, 7])
    batch = np.asarray(sample(jnp.asarray(lg), p3, jnp.asarray(keys), pos, use_sampling=True))
    alone = np.asarray(sample(jnp.asarray(lg[1:2]), SamplingParams.make(1, temperature=1.0),
                              jnp.asarray(keys[1:2]), pos[1:2], use_sampling=True))
    assert batch[1] == alone[0]


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("nan")),
                                dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(min_p=2.0)])
def test_bad_values_raise(kw):
    with pytest.raises(RequestError):
        SamplingParams.make(2, **kw)
