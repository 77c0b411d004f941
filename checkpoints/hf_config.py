"""Hugging Face `config.json` (+ `generation_config.json`) -> `ModelConfig`.

Only what the Llama-family model in `jaxinfer/models/llama.py` can run exactly is accepted;
everything else is a `ConfigError` naming the config field and its value, so an unsupported
checkpoint fails at load time instead of producing wrong logits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.errors import ConfigError

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Hugging Face's per-family defaults for fields a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
_DEFAULT_RMS_NORM_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10000.0
# Qwen2 only applies its sliding window to layers >= max_window_layers (HF default 28).
_DEFAULT_QWEN2_MAX_WINDOW_LAYERS = 28
_SUPPORTED_ACTS = ("silu", "swish")  # the same function under two names in transformers
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from `path`; a missing or malformed file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Fields:
    """Typed access to a config dict; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {field} {message}")

    def positive_int(self, field: str, default: int | None = None) -> int:
        value = self.data.get(field)
        if value is None:
            if default is None:
                raise ConfigError(f"{self.source}: missing required field {field!r}")
            return default
        if not _is_int(value) or value <= 0:
            raise self.error(field, f"must be a positive integer, got {value!r}")
        return value

    def positive_float(self, field: str, default: float) -> float:
        value = self.data.get(field)
        if value is None:
            return default
        if not _is_number(value) or not value > 0:
            raise self.error(field, f"must be a positive number, got {value!r}")
        return float(value)

    def boolean(self, field: str, default: bool) -> bool:
        value = self.data.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, got {value!r}")
        return value


def _check_family(f: _Fields) -> str:
    model_type = f.data.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise f.error("model_type", f"{model_type!r} is not supported (supported: {supported})")
    architectures = f.data.get("architectures")
    if architectures is not None:
        if not isinstance(architectures, list):
            raise f.error("architectures", f"must be a list, got {architectures!r}")
        for arch in architectures:
            if arch not in ARCHITECTURES.values():
                supported = ", ".join(ARCHITECTURES.values())
                raise f.error("architectures", f"entry {arch!r} is not supported "
                                               f"(supported: {supported})")
    return model_type


def _check_unsupported_features(f: _Fields, family: str) -> None:
    act = f.data.get("hidden_act", "silu")
    if act not in _SUPPORTED_ACTS:
        raise f.error("hidden_act", f"{act!r} is not supported (supported: silu)")
    if f.boolean("mlp_bias", False):
        raise f.error("mlp_bias", "true is not supported (the model has no MLP biases)")
    # Llama's attention_bias also puts a bias on o_proj, which the model has no parameter for;
    # loading it would silently drop that bias. Qwen2's q/k/v-only bias is implied by the family.
    if family == "llama" and f.boolean("attention_bias", False):
        raise f.error("attention_bias", "true is not supported for llama (it adds an o_proj "
                                        "bias, which the model does not have)")
    quant = f.data.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        # AWQ and GPTQ int4 load (checkpoints/awq_gptq.py validates the rest of it).
        if method not in ("awq", "gptq"):
            raise f.error("quantization_config", f"(quant_method {method!r}) is not supported "
                          "(awq and gptq int4 are); convert an unquantized checkpoint")


def _number(scaling: dict, field: str, where: str, default: float | None = None) -> float:
    value = scaling.get(field, default)
    if not _is_number(value):
        raise ConfigError(f"{where}.{field} must be a number, got {value!r}")
    return float(value)


def _rope(f: _Fields, max_positions: int) -> tuple[float, RopeScaling]:
    """rope_theta and RopeScaling from either the classic or the transformers-5 layout.

    Classic: top-level `rope_theta` plus an optional `rope_scaling` dict. transformers 5 writes
    one `rope_parameters` dict that holds rope_theta, rope_type and the scaling fields.
    """
    theta = f.data.get("rope_theta")
    scaling = f.data.get("rope_scaling")
    where = "rope_scaling"
    params = f.data.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise f.error("rope_parameters", f"must be an object, got {params!r}")
        if any(isinstance(v, dict) for v in params.values()):
            raise f.error("rope_parameters", "per-layer-type RoPE parameters are not supported")
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling, where = params, "rope_parameters"
    if theta is None:
        theta = _DEFAULT_ROPE_THETA
    if not _is_number(theta) or not theta > 0:
        raise f.error("rope_theta", f"must be a positive number, got {theta!r}")

    partial = f.data.get("partial_rotary_factor")
    if isinstance(scaling, dict):
        partial = scaling.get("partial_rotary_factor", partial)
    if partial is not None and partial != 1.0:
        raise f.error("partial_rotary_factor", f"{partial!r} is not supported (only 1.0)")

    if scaling is None:
        return float(theta), RopeScaling()
    if not isinstance(scaling, dict):
        raise f.error(where, f"must be an object or null, got {scaling!r}")
    # `type` is the pre-4.45 name of `rope_type`.
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type is None or rope_type == "default":
        return float(theta), RopeScaling()
    if rope_type not in _ROPE_TYPES:
        raise f.error(f"{where}.rope_type", f"{rope_type!r} is not supported "
                                            f"(supported: {', '.join(_ROPE_TYPES)})")
    loc = f"{f.source}: {where}"
    factor = _number(scaling, "factor", loc)
    if rope_type == "llama3":
        original = scaling.get("original_max_position_embeddings", max_positions)
        if not _is_int(original) or original <= 0:
            raise ConfigError(f"{loc}.original_max_position_embeddings must be a positive "
                              f"integer, got {original!r}")
        rope = RopeScaling(
            rope_type="llama3", factor=factor,
            low_freq_factor=_number(scaling, "low_freq_factor", loc),
            high_freq_factor=_number(scaling, "high_freq_factor", loc),
            original_max_position_embeddings=original)
    elif rope_type == "dynamic":
        # HF's dynamic NTK grows the base past max_position_embeddings; that is the original.
        rope = RopeScaling(rope_type="dynamic", factor=factor,
                           original_max_position_embeddings=max_positions)
    else:
        rope = RopeScaling(rope_type="linear", factor=factor)
    return float(theta), rope


def _sliding_window(f: _Fields, family: str, num_layers: int) -> int | None:
    if family == "llama":
        return None
    window = f.data.get("sliding_window")
    if window is not None and (not _is_int(window) or window <= 0):
        raise f.error("sliding_window", f"must be a positive integer or null, got {window!r}")
    if family == "mistral" or window is None:
        return window
    # Qwen2: the window is off unless use_sliding_window, and then only applies to the layers
    # that transformers marks "sliding_attention" (layer_types, or i >= max_window_layers).
    if not f.boolean("use_sliding_window", False):
        return None
    layer_types = f.data.get("layer_types")
    if layer_types is None:
        first = f.data.get("max_window_layers", _DEFAULT_QWEN2_MAX_WINDOW_LAYERS)
        if not _is_int(first) or first < 0:
            raise f.error("max_window_layers", f"must be a non-negative integer, got {first!r}")
        sliding = [i >= first for i in range(num_layers)]
        field = "max_window_layers"
    else:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise f.error("layer_types", f"must be a list of {num_layers} entries, "
                                         f"got {layer_types!r}")
        sliding = [t == "sliding_attention" for t in layer_types]
        field = "layer_types"
    if all(sliding):
        return window
    if not any(sliding):
        logger.info("%s: use_sliding_window is true but no layer slides (%s); using full "
                    "attention", f.source, field)
        return None
    raise f.error(field, "gives a sliding window to some layers only, which is not supported "
                         "(the window must apply to all layers or none)")


def _token_ids(f: _Fields, generation: dict[str, Any] | None,
               gen_source: str) -> tuple[int | None, tuple[int, ...]]:
    """bos/eos ids; generation_config.json wins where it sets them (HF generates with it)."""
    bos, bos_src = f.data.get("bos_token_id"), f.source
    eos, eos_src = f.data.get("eos_token_id"), f.source
    if generation is not None:
        if generation.get("bos_token_id") is not None:
            bos, bos_src = generation["bos_token_id"], gen_source
        if generation.get("eos_token_id") is not None:
            eos, eos_src = generation["eos_token_id"], gen_source
    if bos is not None and (not _is_int(bos) or bos < 0):
        raise ConfigError(f"{bos_src}: bos_token_id must be a non-negative integer, got {bos!r}")
    if eos is None:
        eos_ids: tuple = ()
    elif _is_int(eos):
        eos_ids = (eos,)
    elif isinstance(eos, list):
        eos_ids = tuple(eos)
    else:
        eos_ids = (None,)  # rejected below with the original value in the message
    if any(not _is_int(i) or i < 0 for i in eos_ids):
        raise ConfigError(f"{eos_src}: eos_token_id must be an integer or a list of integers, "
                          f"got {eos!r}")
    return bos, eos_ids


def model_config_from_dict(data: dict[str, Any], *, source: str = "config.json",
                           generation: dict[str, Any] | None = None,
                           generation_source: str = "generation_config.json") -> ModelConfig:
    """Map a parsed Hugging Face config (and optional generation config) to a ModelConfig."""
    f = _Fields(data, source)
    family = _check_family(f)
    _check_unsupported_features(f, family)
    hidden = f.positive_int("hidden_size")
    heads = f.positive_int("num_attention_heads")
    layers = f.positive_int("num_hidden_layers")
    head_dim = f.data.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise f.error("hidden_size", f"({hidden}) is not divisible by num_attention_heads "
                                         f"({heads}) and no head_dim is given")
        head_dim = hidden // heads
    else:
        head_dim = f.positive_int("head_dim")
    max_positions = f.positive_int("max_position_embeddings", _DEFAULT_MAX_POSITIONS[family])
    rope_theta, rope_scaling = _rope(f, max_positions)
    bos, eos = _token_ids(f, generation, generation_source)
    try:
        cfg = ModelConfig(
            family=family,
            vocab_size=f.positive_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.positive_int("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=f.positive_int("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=f.positive_float("rms_norm_eps", _DEFAULT_RMS_NORM_EPS),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=f.boolean("tie_word_embeddings", False),
            attention_bias=family == "qwen2",
            sliding_window=_sliding_window(f, family, layers),
            bos_token_id=bos,
            eos_token_ids=eos,
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def model_config_from_hf(model_dir: str | Path) -> ModelConfig:
    """Read `<model_dir>/config.json` (+ `generation_config.json` if present) as a ModelConfig."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    data = read_json(config_path)
    gen_path = model_dir / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else None
    cfg = model_config_from_dict(data, source=str(config_path), generation=generation,
                                 generation_source=str(gen_path))
    logger.debug("%s: %s", config_path, cfg)
    return cfg
