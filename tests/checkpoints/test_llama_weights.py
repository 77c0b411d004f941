"""HF tensors -> stacked jaxinfer params: values, layout, and the errors for bad checkpoints."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from checkpoints import llama as ckpt_llama
from checkpoints.hf_config import model_config_from_hf
from checkpoints.safetensors_io import open_weights
from jaxinfer.errors import CheckpointError
from jaxinfer.models import llama as model_llama

pytest.importorskip("transformers")
st_torch = pytest.importorskip("safetensors.torch")


def _params(path, dtype="float32"):
    cfg = model_config_from_hf(path)
    return cfg, ckpt_llama.hf_params_dict(open_weights(path), cfg, dtype=dtype)


def _expected(state: dict[str, np.ndarray], cfg) -> dict:
    """The documented transforms, written out independently of checkpoints.llama."""
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def stack(fn, name):
        return np.stack([fn(state[f"model.layers.{i}.{name}"]) for i in range(cfg.num_layers)])

    layers = {
        "attn_norm": stack(lambda w: w, "input_layernorm.weight"),
        "wq": stack(lambda w: w.T.reshape(D, N, H), "self_attn.q_proj.weight"),
        "wk": stack(lambda w: w.T.reshape(D, K, H), "self_attn.k_proj.weight"),
        "wv": stack(lambda w: w.T.reshape(D, K, H), "self_attn.v_proj.weight"),
        "wo": stack(lambda w: w.T.reshape(N, H, D), "self_attn.o_proj.weight"),
        "mlp_norm": stack(lambda w: w, "post_attention_layernorm.weight"),
        "w_gate": stack(lambda w: w.T, "mlp.gate_proj.weight"),
        "w_up": stack(lambda w: w.T, "mlp.up_proj.weight"),
        "w_down": stack(lambda w: w.T, "mlp.down_proj.weight"),
    }
    if cfg.attention_bias:
        layers["bq"] = stack(lambda b: b.reshape(N, H), "self_attn.q_proj.bias")
        layers["bk"] = stack(lambda b: b.reshape(K, H), "self_attn.k_proj.bias")
        layers["bv"] = stack(lambda b: b.reshape(K, H), "self_attn.v_proj.bias")
    out = {"embed": state["model.embed_tokens.weight"], "layers": layers,
           "final_norm": state["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = state["lm_head.weight"].T
    return out


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "mistral"])
def test_values_match_torch_state_dict(hf_model, name):
    m = hf_model(name)
    cfg, params = _params(m.path)
    expected = _expected(m.state, cfg)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    # wq[l] == q_proj.weight.T.reshape(D, N, H), spelled out once more for the record.
    q1 = m.state["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(params["layers"]["wq"][1], q1.T.reshape(64, 4, 16))


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "mistral"])
def test_structure_and_shapes_match_the_model(hf_model, name):
    cfg, params = _params(hf_model(name).path, dtype="bfloat16")
    abstract = nnx.to_pure_dict(nnx.split(model_llama.abstract_model(cfg))[1])
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert p.shape == a.shape and p.dtype.name == "bfloat16"
    assert ckpt_llama.num_hf_tensors(cfg) == len([
        n for n in hf_model(name).state if not n.endswith("inv_freq")
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")])


def test_sharded_equals_unsharded(hf_model):
    sharded = hf_model("llama_sharded").path
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    _, a = _params(hf_model("llama").path)
    _, b = _params(sharded)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bf16_checkpoint_and_dtype_casts(hf_model):
    m = hf_model("llama_bf16")
    assert open_weights(m.path).info("model.norm.weight").dtype == "BF16"
    cfg, p32 = _params(m.path, "float32")
    _, p16 = _params(m.path, "bfloat16")
    # bf16 -> f32 is exact, and back again gives the stored bits.
    jax.tree.map(np.testing.assert_array_equal, p32, _expected(m.state, cfg))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(np.float32), b), p16, p32)
    assert p16["embed"].dtype == np.dtype(ml_dtypes.bfloat16)
    _, f16 = _params(m.path, "float16")
    assert f16["layers"]["wq"].dtype == np.float16


def _rewrite(path, edit):
    """Load model.safetensors, let `edit` change the dict, write it back."""
    file = path / "model.safetensors"
    tensors = st_torch.load_file(file)
    edit(tensors)
    st_torch.save_file(tensors, file)


def test_missing_tensor(hf_copy):
    path = hf_copy("llama")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    cfg = model_config_from_hf(path)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        ckpt_llama.hf_params(open_weights(path), cfg, dtype="float32")


def test_missing_lm_head_when_untied(hf_copy):
    path = hf_copy("llama")
    _rewrite(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="'lm_head.weight' is missing"):
        _params(path)


def test_misshaped_tensor(hf_copy):
    import torch

    path = hf_copy("qwen2")
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.bias": torch.zeros(31)}))
    with pytest.raises(CheckpointError) as e:
        _params(path)
    assert str(e.value).startswith(
        "tensor 'model.layers.0.self_attn.k_proj.bias' has shape [31], expected [32]")


def test_config_disagreeing_with_weights(hf_copy):
    path = hf_copy("llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' has shape \[128, 64\], "
                                              r"expected \[100, 64\]"):
        _params(path)


def test_extra_tensors_are_ignored(hf_copy, caplog):
    import torch

    path = hf_copy("llama_tied")
    _rewrite(path, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "lm_head.weight": torch.zeros(128, 64),  # tied: the embedding is the head
        "model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with caplog.at_level("DEBUG", logger="checkpoints.llama"):
        _, params = _params(path)
    assert "lm_head" not in params
    debug = [r.message for r in caplog.records if r.levelname == "DEBUG"]
    warning = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert any("inv_freq" in m and "lm_head.weight" in m for m in debug)
    assert any("mlp.extra.weight" in m for m in warning)


def test_progress_callback_sees_every_tensor(hf_model):
    path = hf_model("qwen2").path
    cfg = model_config_from_hf(path)
    seen: list[str] = []
    ckpt_llama.hf_params_dict(open_weights(path), cfg, dtype="float32", on_tensor=seen.append)
    assert len(seen) == len(set(seen)) == ckpt_llama.num_hf_tensors(cfg)
    assert "model.layers.1.self_attn.v_proj.bias" in seen
