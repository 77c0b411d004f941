import pytest

from jaxinfer import buckets
from jaxinfer.config import PRESETS, EngineConfig, ModelConfig, RopeScaling, preset, replace
from jaxinfer.errors import CapacityError, ConfigError


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
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig(batch_buckets=(8, 1024), max_num_batched_tokens=512,
                     prefill_buckets=(128,))
    with pytest.raises(ConfigError, match="page_buckets"):  # must reach pages_per_seq (7)
        EngineConfig(max_seq_len=100, page_size=16, page_buckets=(1, 2, 4))
    with pytest.raises(ConfigError, match="tp_reduce_dtype"):
        EngineConfig(tp_reduce_dtype="int8")


def test_engine_buckets():
    """The compiled shapes come from one bucket set: decode block-table widths are the full
    width unless `page_buckets` lists more; prefill shapes are rows x chunks within the token
    budget; decode runs 1 or `decode_steps` tokens per dispatch."""
    eng = EngineConfig(max_seq_len=100, page_size=16, batch_buckets=(8, 16))
    assert eng.pages_per_seq == 7 and buckets.page_widths(eng) == (7,)
    narrow = replace(eng, page_buckets=(1, 2, 4, 7))
    assert buckets.page_widths(narrow) == (1, 2, 4, 7)
    assert buckets.decode_shape(narrow, 3, 3) == (8, 4)
    eng = EngineConfig(batch_buckets=(4, 8), prefill_buckets=(32, 128), prefill_rows=(1, 4),
                       max_num_batched_tokens=128, decode_steps=4)
    assert eng.num_slots == 8
    assert buckets.prefill_shapes(eng) == [(1, 32), (1, 128), (4, 32)]
    assert buckets.prefill_shape(eng, 2, 20) == (4, 32)
    assert buckets.prefill_shape(eng, 2, 100) is None
    assert buckets.decode_step_counts(eng) == (1, 4)
    with pytest.raises(CapacityError):
        buckets.decode_shape(eng, 9, 1)


def test_rope_scaling_validation_and_json_round_trip():
    with pytest.raises(ConfigError, match="rope_type"):
        RopeScaling(rope_type="yarn")
    cfg = preset("llama-3.2-1b-shape")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_json({**cfg.to_json(), "bogus": 1})
