import pytest

from jaxinfer.config import PRESETS, EngineConfig, ModelConfig, RopeScaling, preset, replace
from jaxinfer.errors import ConfigError


def test_presets_are_consistent():
    for name, cfg in PRESETS.items():
        assert cfg.num_heads % cfg.num_kv_heads == 0, name
        hash(cfg)
    one_b = preset("llama-3.2-1b-shape")
    assert abs(one_b.num_params - 1.236e9) / 1.236e9 < 0.01


@pytest.mark.parametrize("field,value", [("num_heads", 5), ("head_dim", 7), ("vocab_size", 0),
                                         ("family", "gpt2"), ("sliding_window", 0)])
def test_model_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        replace(preset("dummy"), **{field: value})


def test_engine_config_errors():
    with pytest.raises(ConfigError, match="page_size"):
        EngineConfig(page_size=12)
    with pytest.raises(ConfigError, match="prefill_buckets"):
        EngineConfig(prefill_buckets=(64, 32))
    with pytest.raises(ConfigError, match="kernels"):
        EngineConfig(kernels="cuda")
    with pytest.raises(ConfigError, match="no field"):
        replace(EngineConfig(), pagesize=4)
    assert EngineConfig(max_seq_len=100, page_size=16).page_table_buckets == (1, 2, 4, 7)


def test_rope_scaling_validation_and_json_round_trip():
    with pytest.raises(ConfigError, match="rope_type"):
        RopeScaling(rope_type="yarn")
    cfg = preset("llama-3.2-1b-shape")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_json({**cfg.to_json(), "bogus": 1})
