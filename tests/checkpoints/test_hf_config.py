"""config.json -> ModelConfig: each family, RoPE scalings, and the errors for what is refused."""

from __future__ import annotations

import json

import pytest

from checkpoints.hf_config import model_config_from_dict, model_config_from_hf
from jaxinfer.config import RopeScaling
from jaxinfer.errors import ConfigError

BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
}


def cfg_of(**changes):
    data = {**BASE, **changes}
    for key, value in changes.items():
        if value is ...:  # `...` deletes a field
            del data[key]
    return model_config_from_dict(data)


def write_dir(tmp_path, config: dict, generation: dict | None = None):
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_llama_basic_fields():
    cfg = cfg_of()
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        "llama", 128, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling()
    assert cfg.max_position_embeddings == 256
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and cfg.sliding_window is None


def test_defaults_kv_heads_head_dim_and_tie():
    cfg = cfg_of(num_key_value_heads=..., tie_word_embeddings=..., rope_theta=...)
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16
    assert cfg.tie_word_embeddings is False and cfg.rope_theta == 10000.0
    assert cfg_of(head_dim=32).head_dim == 32  # explicit head_dim wins over hidden / heads
    assert cfg_of(tie_word_embeddings=True).tie_word_embeddings


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_transformers_written_configs(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[family]
    hf = getattr(transformers, cls)(vocab_size=128, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=1, max_position_embeddings=512,
                                    rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=5,
                                    eos_token_id=6)
    hf.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}[family]]
    hf.save_pretrained(tmp_path)
    cfg = model_config_from_hf(tmp_path)
    assert cfg.family == family
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 4, 1, 16)
    assert cfg.intermediate_size == 96 and cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6
    assert cfg.bos_token_id == 5 and cfg.eos_token_ids == (6,)
    assert cfg.attention_bias == (family == "qwen2")
    assert cfg.sliding_window == (4096 if family == "mistral" else None)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_llama3(key):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if key == "rope_parameters":  # transformers-5 layout: theta inside the same dict
        cfg = cfg_of(rope_theta=..., rope_parameters={**scaling, "rope_theta": 5e5})
    else:
        cfg = cfg_of(rope_scaling=scaling)
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling == RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)


def test_rope_linear_dynamic_and_type_alias():
    assert cfg_of(rope_scaling={"type": "linear", "factor": 2.0}).rope_scaling == RopeScaling(
        rope_type="linear", factor=2.0)
    dyn = cfg_of(rope_scaling={"rope_type": "dynamic", "factor": 4.0}).rope_scaling
    assert dyn == RopeScaling(rope_type="dynamic", factor=4.0,
                              original_max_position_embeddings=256)
    assert cfg_of(rope_scaling=None).rope_scaling == RopeScaling()
    assert cfg_of(rope_scaling={"rope_type": "default"}).rope_scaling == RopeScaling()
    assert cfg_of(rope_parameters={"rope_type": "default", "rope_theta": 7.0}).rope_theta == 7.0


@pytest.mark.parametrize("rope_type", ["yarn", "longrope", "su"])
def test_rope_unsupported_types(rope_type):
    with pytest.raises(ConfigError, match=rf"rope_scaling\.rope_type '{rope_type}'"):
        cfg_of(rope_scaling={"rope_type": rope_type, "factor": 4.0})
    with pytest.raises(ConfigError, match=rf"rope_parameters\.rope_type '{rope_type}'"):
        cfg_of(rope_parameters={"rope_type": rope_type, "factor": 4.0, "rope_theta": 1e4})


def test_rope_missing_factor_and_partial_rotary():
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor"):
        cfg_of(rope_scaling={"rope_type": "linear"})
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        cfg_of(partial_rotary_factor=0.5)


def test_unknown_model_type_names_field():
    with pytest.raises(ConfigError) as e:
        cfg_of(model_type="gpt2")
    assert str(e.value) == ("config.json: model_type 'gpt2' is not supported "
                            "(supported: llama, mistral, qwen2)")
    with pytest.raises(ConfigError, match="model_type None"):
        cfg_of(model_type=...)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="architectures entry 'LlamaForSequenceClassification'"):
        cfg_of(architectures=["LlamaForSequenceClassification"])


@pytest.mark.parametrize("changes, field", [
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
])
def test_unsupported_features(changes, field):
    with pytest.raises(ConfigError, match=field):
        cfg_of(**changes)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads"])
def test_required_sizes(field):
    with pytest.raises(ConfigError, match=f"missing required field '{field}'"):
        cfg_of(**{field: ...})
    with pytest.raises(ConfigError, match=f"{field} must be a positive integer, got 0"):
        cfg_of(**{field: 0})
    with pytest.raises(ConfigError, match=field):
        cfg_of(**{field: -3})


def test_inconsistent_sizes():
    with pytest.raises(ConfigError, match="num_key_value_heads must be a positive integer"):
        cfg_of(num_key_value_heads=0)
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        cfg_of(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        cfg_of(hidden_size=66)


def test_mistral_sliding_window():
    mistral = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    assert cfg_of(**mistral, sliding_window=4096).sliding_window == 4096
    assert cfg_of(**mistral, sliding_window=None).sliding_window is None
    with pytest.raises(ConfigError, match="sliding_window"):
        cfg_of(**mistral, sliding_window=0)
    assert cfg_of(sliding_window=4096).sliding_window is None  # llama has no window


def test_qwen2_sliding_window_follows_layer_types():
    qwen = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64}
    assert cfg_of(**qwen, use_sliding_window=False).sliding_window is None
    assert cfg_of(**qwen, use_sliding_window=True, max_window_layers=0).sliding_window == 64
    # HF slides only layers >= max_window_layers: none of the 2 layers here -> full attention.
    assert cfg_of(**qwen, use_sliding_window=True, max_window_layers=28).sliding_window is None
    both = ["sliding_attention", "sliding_attention"]
    assert cfg_of(**qwen, use_sliding_window=True, layer_types=both).sliding_window == 64
    with pytest.raises(ConfigError, match="max_window_layers"):
        cfg_of(**qwen, use_sliding_window=True, max_window_layers=1)
    assert cfg_of(**qwen).attention_bias


def test_generation_config_eos_list_and_bos(tmp_path):
    d = write_dir(tmp_path, {**BASE, "bos_token_id": 1, "eos_token_id": 2},
                  {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
    cfg = model_config_from_hf(d)
    assert cfg.bos_token_id == 128000 and cfg.eos_token_ids == (128001, 128008, 128009)


def test_eos_from_config_when_generation_config_lacks_it(tmp_path):
    d = write_dir(tmp_path, {**BASE, "bos_token_id": 1, "eos_token_id": [2, 3]},
                  {"temperature": 0.6})
    cfg = model_config_from_hf(d)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2, 3)
    with pytest.raises(ConfigError, match="eos_token_id"):
        model_config_from_dict({**BASE, "eos_token_id": "2"})


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        model_config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        model_config_from_hf(tmp_path)


def test_shared_trained_model_config():
    from pathlib import Path

    d = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K-hf"
    if not d.is_dir():
        pytest.skip("shared/models not present")
    cfg = model_config_from_hf(d)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 5, 8, 4)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (2,)
