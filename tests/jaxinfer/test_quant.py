"""Quantized weights: quantizer error bounds, layouts and axes, `ops.linear`, quantized models.

Accuracy on a tiny random Hugging Face Llama (float32, initializer_range 0.2 so logits are not
flat), teacher forced along the float model's greedy continuation: int8 logits stay within 8%
of the logit range (rms error under 10% of the logits' std) and the argmax agrees at >= 90% of
positions; fp8 W8A8 within looser bounds (see the test). On the trained TinyStories checkpoints
(`../shared/models`, skipped when absent) the mean next-token NLL of a fixed story must move by
less than 0.02 nats (int8) and 0.1 nats (fp8); the numbers are logged
(`-o log_cli=true --log-cli-level=INFO` shows them).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfer import ops, quant
from jaxinfer.config import EngineConfig
from jaxinfer.errors import ConfigError
from jaxinfer.engine.llm import LLM
from jaxinfer.kv_cache import cache_axes, init_cache
from jaxinfer.model_loader import load_model
from jaxinfer.quant import QuantArray
from pallas_kernels import qmatmul as qm
from sharding.mesh import make_mesh
from sharding.rules import logical_to_spec, tree_shardings

logger = logging.getLogger(__name__)

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
         "the park. One day, she saw a big red ball under a tree. She ran to get it, but a dog "
         "took it first. Lily was sad, so her mom gave her a hug and they went home together.")


def _w(shape, seed=0, scale=0.02):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


# -- quantizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("group", [None, 64])
def test_int8_round_trip_within_half_a_step(group, transposed):
    w = _w((2, 128, 4, 16), seed=1)  # [L, D, N, H]: one stacked dim, one contraction dim
    qa = quant.quantize_int8(w, batch=1, contract=1, group=group, transposed=transposed)
    assert qa.q.dtype == jnp.int8 and qa.scale.dtype == jnp.float32
    assert qa.q.shape == ((2, 4, 16, 128) if transposed else w.shape)
    assert qa.scale.shape == ((2, 4, 16) if group is None else (2, 2, 4, 16))
    err = np.abs(np.asarray(quant.dequantize(qa)) - np.asarray(w))
    step = np.asarray(qa.scale)
    if group is None:
        bound = np.broadcast_to(step[:, None], w.shape)
    else:  # scale [L, K/g, N, H] -> per row of K
        bound = np.repeat(step, group, axis=1)
    assert (err <= bound / 2 + 1e-7).all()
    # The largest value of each column (group) is hit exactly: full int8 range used.
    assert int(np.abs(np.asarray(qa.q)).max()) == 127


def test_fp8_round_trip_relative_error():
    w = _w((96, 3, 32), seed=2)  # wo-like [N, H, D] with two contraction dims
    qa = quant.quantize_fp8(w, contract=2)
    assert qa.q.dtype == jnp.float8_e4m3fn and qa.q.shape == (32, 96, 3)  # [D, N, H]
    assert qa.scale.shape == (32,)
    deq, ref = np.asarray(quant.dequantize(qa)), np.asarray(w)
    s = np.asarray(qa.scale)
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative; subnormals: 2^-10 * scale absolute.
    assert (np.abs(deq - ref) <= np.abs(ref) * 2.0 ** -4 + s * 2.0 ** -10).all()
    assert np.abs(deq).max() == pytest.approx(np.abs(ref).max(), rel=1e-6)


def test_zero_columns_get_unit_scale():
    w = _w((64, 8)).at[:, 3].set(0.0)
    for qa in (quant.quantize_int8(w), quant.quantize_fp8(w)):
        assert float(qa.scale[3]) == 1.0
        assert np.all(np.asarray(quant.dequantize(qa))[:, 3] == 0.0)
        assert np.isfinite(np.asarray(qa.scale)).all()


def test_int4_round_trip_and_layout():
    """int4-g128 on a stacked [L, K, N] weight whose K (448) ends in a short group of 64: codes
    and zero points in 0..15, exact zeros stay exact, and the clipping search never does worse
    (squared error per group) than the plain min/max range it starts from."""
    w = _w((2, 448, 8), seed=3).at[0, 5, 2].set(0.0)
    qa = quant.quantize_int4(w, group=128, batch=1)
    assert qa.kind == "int4" and qa.transposed and qa.group == 128
    assert qa.q.dtype == jnp.uint8 and qa.q.shape == (2, 8, 224)  # [L, N, K/2]
    assert qa.scale.shape == qa.zero.shape == (2, 4, 8) and qa.zero.dtype == jnp.int8
    z = np.asarray(qa.zero)
    assert z.min() >= 0 and z.max() <= 15
    deq = np.asarray(quant.dequantize(qa))
    assert deq.shape == w.shape and deq[0, 5, 2] == 0.0
    ref = np.asarray(w)
    # The plain rule (shrink 1): range [min(w, 0), max(w, 0)] over 15 steps.
    pad = np.concatenate([ref, np.zeros((2, 64, 8), np.float32)], axis=1).reshape(2, 4, 128, 8)
    lo, hi = np.minimum(pad.min(2), 0), np.maximum(pad.max(2), 0)
    s = (hi - lo) / 15
    zp = np.round(-lo / s)
    plain = (np.clip(np.round(pad / s[:, :, None]) + zp[:, :, None], 0, 15) - zp[:, :, None]) \
        * s[:, :, None]
    plain_err = ((plain - pad) ** 2).sum(2)
    deq_pad = np.concatenate([deq, np.zeros((2, 64, 8), np.float32)], 1).reshape(pad.shape)
    err = ((deq_pad - pad) ** 2).sum(2)
    assert (err <= plain_err * (1 + 1e-5) + 1e-12).all()
    assert err.sum() < plain_err.sum()  # the search found better ranges somewhere
    # wo-like: two contraction dims [N, H, D] -> q [D, N, H/2] (packed along the flattened K).
    wo = quant.quantize_int4(_w((4, 64, 32), seed=4), group=128, contract=2)
    assert wo.q.shape == (32, 4, 32) and wo.scale.shape == (2, 32)
    np.testing.assert_allclose(np.asarray(quant.dequantize(wo)), np.asarray(_w((4, 64, 32), 4)),
                               atol=float(np.max(np.asarray(wo.scale))) * 5)
    with pytest.raises(ConfigError, match="even"):
        quant.quantize_int4(_w((63, 8)), group=128)


def test_bad_quant_arguments():
    with pytest.raises(ConfigError, match="divide"):
        quant.quantize_int8(_w((100, 8)), group=64)
    with pytest.raises(ConfigError, match="quant must be one of"):
        quant.parse_quant("int4")
    with pytest.raises(ValueError, match="output dim"):
        quant.quantize_int8(_w((64, 8)), contract=2)
    assert quant.parse_quant("int8-g128") == quant.QuantSpec("int8", 128)
    assert quant.parse_quant("int4-g128") == quant.QuantSpec("int4", 128)
    assert quant.parse_quant("none") is None and quant.parse_quant(None) is None


def test_axes_follow_the_weight():
    wo_axes = ("layers", "heads", "head_dim", "embed")
    qa = quant.quantized_axes(wo_axes, quant.QuantSpec("int8", 64), batch=1, contract=2)
    want_q = ("layers", "embed", "heads", "head_dim") if qa.transposed else wo_axes
    assert qa.q == want_q and qa.transposed == quant.TRANSPOSED["int8"]
    assert qa.scale == ("layers", "heads", "embed")  # the group axis shards like heads
    fp8 = quant.quantized_axes(wo_axes, quant.QuantSpec("fp8"), batch=1, contract=2)
    assert fp8.q == ("layers", "embed", "heads", "head_dim") and fp8.transposed
    assert fp8.scale == ("layers", "embed")
    int4 = quant.quantized_axes(wo_axes, quant.QuantSpec("int4", 128), batch=1, contract=2)
    assert int4.q == ("layers", "embed", "heads", "head_dim") and int4.transposed
    assert int4.scale == int4.zero == ("layers", "heads", "embed")


def test_split_and_join_are_inverse():
    w = {"layers": {"wq": _w((2, 64, 4, 8)), "norm": jnp.ones(3)}}
    spec = quant.QuantSpec("int8", 64)
    layout = {("layers", "wq"): (1, 1)}
    params = quant.quantize_params(w, layout, spec)
    split = quant.split_quant(params)
    assert set(split["layers"]["wq"]) == {"q", "scale"}
    back = quant.join_quant(split, layout, spec)
    assert back["layers"]["wq"] == params["layers"]["wq"]  # same arrays, same static fields
    assert back["layers"]["norm"] is w["layers"]["norm"]
    spec4 = quant.QuantSpec("int4", 128)  # int4 adds its zero points to the stored entry
    params4 = quant.quantize_params(w, layout, spec4)
    split4 = quant.split_quant(params4)
    assert set(split4["layers"]["wq"]) == {"q", "scale", "zero"}
    assert quant.join_quant(split4, layout, spec4)["layers"]["wq"] == params4["layers"]["wq"]
    with pytest.raises(ValueError, match="quantized"):
        quant.join_quant(split, layout, spec4)


# -- ops.linear ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "int8-g64", "fp8", "int4-g128"])
@pytest.mark.parametrize("kernels", ["reference", "pallas"])
def test_linear_matches_the_dequantized_einsum(mode, kernels):
    spec = quant.parse_quant(mode)
    wo = _w((2, 4, 16, 128), seed=5)  # stacked wo [L, N, H, D]: two contraction dims
    qa = quant.quantize(wo, spec, batch=1, contract=2)
    layer1 = jax.tree.map(lambda a: a[1], qa)  # what lax.scan hands the layer body
    assert isinstance(layer1, QuantArray)
    x = jax.random.normal(jax.random.key(6), (3, 5, 4, 16), jnp.float32)  # [B, T, N, H]
    got = ops.linear(x, layer1, contract=2, kernels=kernels)
    assert got.shape == (3, 5, 128) and got.dtype == jnp.float32
    if spec.kind == "fp8":  # W8A8: x goes through its per-token e4m3 rounding first
        x_q, x_s = qm.quantize_rows_fp8(x.reshape(15, 64))
        x = (x_q.astype(jnp.float32) * x_s[:, None]).reshape(x.shape)
    want = jnp.einsum("btnh,nhd->btd", x, quant.dequantize(layer1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * float(
        jnp.sqrt(jnp.mean(want ** 2))), rtol=1e-5)


def test_linear_on_float_weights_is_the_einsum():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8), jnp.float32)
    w = _w((4, 8, 16))
    got = ops.linear(x, w, contract=2, kernels="pallas", out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum("btnh,nhd->btd", x, w)),
                               rtol=1e-6, atol=1e-6)


# -- models --------------------------------------------------------------------------------------

def _one_device():
    return make_mesh("dp=1", devices=jax.devices()[:1])


def test_random_preset_quantized_at_load_is_sharded_like_its_weights():
    mesh = make_mesh("tp=2", devices=jax.devices()[:2])
    loaded = load_model("dummy", mesh=mesh, dtype="float32", quant="int8-g64")
    assert loaded.quant == "int8-g64"
    layers = loaded.params["layers"]
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        assert isinstance(layers[name], QuantArray) and layers[name].group == 64, name
    assert not isinstance(loaded.params["embed"], QuantArray)
    float_model = load_model("dummy", mesh=mesh, dtype="float32")
    spec = partial(logical_to_spec, mesh_axes=mesh.axis_names)
    wo_q = (("layers", "embed", "heads", "head_dim") if layers["wo"].transposed
            else ("layers", "heads", "head_dim", "embed"))
    assert layers["wo"].q.sharding.spec == spec(wo_q)
    assert "tp" in layers["wo"].q.sharding.spec
    # wo [L, N, H, D]: scale [L, N*H/64, D], the group axis split over tp like the heads.
    assert layers["wo"].scale.sharding.spec == spec(("layers", "heads", "embed"))
    assert "tp" in layers["wo"].scale.sharding.spec
    assert layers["w_gate"].scale.sharding.spec == spec(("layers", "embed", "ffn"))
    np.testing.assert_allclose(np.asarray(quant.dequantize(layers["w_down"])),
                               np.asarray(float_model.params["layers"]["w_down"]),
                               atol=float(jnp.max(layers["w_down"].scale)))


def test_int4_groups_must_split_at_group_boundaries():
    """dummy's FFN (384 = 3 groups of 128) and wo (128: one group) cannot be split over tp=2
    at group boundaries: a clear error, not scales sharded apart from their rows."""
    mesh = make_mesh("tp=2", devices=jax.devices()[:2])
    with pytest.raises(ConfigError, match="group boundaries"):
        load_model("dummy", mesh=mesh, dtype="float32", quant="int4-g128")


def _hf_dir(tmp_path_factory, tie: bool) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf_quant")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    return _hf_dir(tmp_path_factory, tie=False)


def _llm(loaded, kernels: str = "reference") -> LLM:
    engine = EngineConfig(page_size=8, num_pages=64, max_seq_len=64, dtype="float32",
                          prefill_buckets=(16,), prefill_rows=(1,), batch_buckets=(1,),
                          decode_steps=8, kernels=kernels)
    return LLM.from_loaded(loaded, engine, mesh=_one_device())


def _greedy(llm: LLM, prompt: list[int], max_tokens: int) -> list[int]:
    [[out]] = llm.generate([llm.request(prompt, max_tokens=max_tokens)])
    return out.token_ids


PROMPT = [5, 17, 99, 3, 250, 42, 7, 11, 200, 3]


def _all_logits(loaded, ids) -> np.ndarray:
    """Float32 logits [T, V] at every position of `ids` (one sequence, teacher forced)."""
    t = len(ids)
    pages = -(-t // 16)
    engine = EngineConfig(page_size=16, num_pages=pages, max_seq_len=pages * 16,
                          dtype="float32")
    cache = init_cache(loaded.cfg, engine, tree_shardings(_one_device(), cache_axes()))

    @jax.jit
    def run(params, cache, tokens):
        model = nnx.merge(loaded.graphdef, params)
        positions = jnp.arange(t, dtype=jnp.int32)[None]
        tables = jnp.arange(pages, dtype=jnp.int32)[None]
        hidden, _ = model(tokens[None], positions, cache, tables, jnp.asarray([t], jnp.int32),
                          positions)
        return model.logits(hidden[0])

    return np.asarray(run(loaded.params, cache, jnp.asarray(ids, jnp.int32)))


def test_int8_and_fp8_stay_close_to_float(hf_llama):
    """Along the float model's own greedy continuation (teacher forced, so one early flip does
    not change every later comparison), the quantized models' logits stay within a fraction
    of the logit range and their argmax agrees at most positions."""
    ref_loaded = load_model(str(hf_llama), mesh=_one_device(), dtype="float32")
    ref = _llm(ref_loaded)
    assert ref.quant == "none"
    ref_tokens = _greedy(ref, PROMPT, 24)
    ids = PROMPT + ref_tokens
    ref_logits = _all_logits(ref_loaded, ids)[len(PROMPT) - 1:-1]  # predicts ref_tokens
    assert (ref_logits.argmax(-1) == np.asarray(ref_tokens)).all()
    spread = float(np.mean(ref_logits.max(-1) - ref_logits.min(-1)))
    # Measured here: int8 rms 0.05, max 4% of the range, argmax 96%; fp8 (activations too)
    # rms 0.25, max 24%, argmax 83%. This random model amplifies errors: on the trained
    # TinyStories models both cost < 0.003 nats (test_trained_model_nll_delta).
    for mode, max_tol, rms_tol, min_match in (("int8", 0.08, 0.1, 0.9),
                                              ("fp8", 0.4, 0.4, 0.75)):
        loaded = load_model(str(hf_llama), mesh=_one_device(), dtype="float32", quant=mode)
        assert isinstance(loaded.params["layers"]["wq"], QuantArray)
        logits = _all_logits(loaded, ids)[len(PROMPT) - 1:-1]
        err = float(np.max(np.abs(logits - ref_logits)))
        rel = float(np.sqrt(np.mean((logits - ref_logits) ** 2)) / np.std(ref_logits))
        match = float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1)))
        logger.info("%s: logit error max %.4f of a %.2f range, rms %.4f of the std; argmax "
                    "equal at %.0f%% of %d positions", mode, err, spread, rel, 100 * match,
                    len(ref_logits))
        assert err <= max_tol * spread, (mode, err, spread)
        assert rel <= rms_tol, (mode, rel)
        assert match >= min_match, mode


@pytest.mark.slow  # the quantized kernels against their references: tests/pallas_kernels
@pytest.mark.parametrize("mode", ["int8", "int4-g128"])  # (test_int4_matmul, test_qmatmul gate)
def test_pallas_and_reference_kernels_give_equal_greedy_tokens(hf_llama, mode):
    """Untied lm_head is quantized too (int8), so the head goes through the kernel as well."""
    loaded = load_model(str(hf_llama), mesh=_one_device(), dtype="float32", quant=mode)
    assert isinstance(loaded.params["lm_head"], QuantArray) == (mode == "int8")
    ref, pal = _llm(loaded, "reference"), _llm(loaded, "pallas")
    assert ref.quant == pal.quant == mode
    a = _greedy(ref, PROMPT, 12)
    assert len(a) == 12 and _greedy(pal, PROMPT, 12) == a


# -- trained TinyStories models: NLL delta -------------------------------------------------------

def _mean_nll(model_dir: Path, quant_mode: str | None) -> float:
    """Mean next-token negative log-likelihood of BOS + STORY under the model."""
    loaded = load_model(str(model_dir), mesh=_one_device(), dtype="float32", quant=quant_mode)
    ids = loaded.tokenizer.encode(STORY)[:loaded.cfg.max_position_embeddings]
    logp = jax.nn.log_softmax(jnp.asarray(_all_logits(loaded, ids)[:-1]), axis=-1)
    return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1)))


@pytest.mark.slow  # the measured NLL cost (README); test_int8_and_fp8_stay_close_to_float gates
@pytest.mark.parametrize("name", ["stories260K-hf", "babyllama-tok105-940K-hf"])
def test_trained_model_nll_delta(name):
    path = MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} not present")
    base = _mean_nll(path, None)
    deltas = {mode: _mean_nll(path, mode) - base for mode in ("int8", "fp8")}
    logger.info("%s: mean NLL %.4f (fp32); delta int8 %+.4f, fp8 %+.4f", name, base,
                deltas["int8"], deltas["fp8"])
    assert base < 3.0  # a trained model: well below log(vocab) on its own kind of text
    assert abs(deltas["int8"]) < 0.02, deltas
    assert abs(deltas["fp8"]) < 0.1, deltas
