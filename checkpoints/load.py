"""Load a model directory (Hugging Face or converted) into sharded device arrays.

Both paths place each parameter directly into its `NamedSharding`: a converted directory is
restored by orbax with a sharded target, and a Hugging Face directory is assembled one
parameter at a time on the host and handed to `jax.make_array_from_callback`, which gives each
addressable device only its own slice. Host memory therefore peaks at about one parameter (the
largest, usually the embedding), not the model.

A directory converted with `--quant` holds QuantArrays (`jaxinfer/quant.py`); `load_params`
restores them as such when given the matching quantized shardings (`checkpoint_quant` says
which quantization a directory holds).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints import llama
from checkpoints.dtypes import to_numpy_dtype
from checkpoints.hf_config import model_config_from_hf
from checkpoints.orbax_io import (CONFIG_FILE, flatten, read_checkpoint_info, restore_params,
                                  unflatten)
from checkpoints.quantize import stored_shapes
from checkpoints.safetensors_io import open_weights
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.models.llama import quantized_weights
from jaxinfer.quant import join_quant, parse_quant, split_quant

logger = logging.getLogger(__name__)


def is_converted(model_dir: str | Path) -> bool:
    """True for a directory written by `checkpoints.convert`."""
    return (Path(model_dir) / CONFIG_FILE).is_file()


def _not_a_model_dir(model_dir: Path) -> CheckpointError:
    if not model_dir.is_dir():
        return CheckpointError(f"{model_dir}: no such directory")
    return CheckpointError(f"{model_dir}: not a model directory (no {CONFIG_FILE} or config.json)")


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a converted (jaxinfer_config.json) or Hugging Face (config.json) dir."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return ModelConfig.from_json(data)
    if (model_dir / "config.json").is_file():
        return model_config_from_hf(model_dir)
    raise _not_a_model_dir(model_dir)


def checkpoint_quant(model_dir: str | Path) -> str:
    """The quantization a model directory holds: "none" for Hugging Face and float ones."""
    if not is_converted(model_dir):
        return "none"
    info = read_checkpoint_info(model_dir)
    return "none" if info is None else info.quant


def _check_shardings(shardings: dict, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> None:
    given = set(flatten(shardings))
    missing = sorted("/".join(p) for p in set(shapes) - given)
    extra = sorted("/".join(p) for p in given - set(shapes))
    if missing or extra:
        raise ConfigError(f"shardings do not match the model config's parameters "
                          f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})")


def _to_device(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    # The callback runs once per addressable device with that device's index into the array.
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: np.ascontiguousarray(host[index]))


def _load_hf(model_dir: Path, cfg: ModelConfig, *, dtype: np.dtype, shardings: dict,
             allow_pickle: bool) -> dict:
    reader = open_weights(model_dir, allow_pickle=allow_pickle)
    flat_shardings = flatten(shardings)
    flat: dict[tuple[str, ...], jax.Array] = {}
    for path, host in llama.hf_params(reader, cfg, dtype=dtype):
        flat[path] = _to_device(host, flat_shardings[path])
        del host  # keep one parameter on the host at a time
    return unflatten(flat)


def load_params(model_dir: str | Path, cfg: ModelConfig, *, dtype: Any, shardings: dict,
                allow_pickle: bool = False) -> dict:
    """Load the params pure dict of `jax.Array`s, each placed by its sharding.

    Args:
      model_dir: a converted directory (`jaxinfer_config.json` + `params/`) or a Hugging Face
        one (`config.json` + safetensors).
      cfg: the model config (normally `load_model_config(model_dir)`).
      dtype: parameter dtype ("bfloat16", "float16", "float32" or a numpy/jnp dtype).
      shardings: pure dict of `NamedSharding`, the structure of the model's params, e.g.
        `sharding.tree_shardings(mesh, llama.param_axes(llama.abstract_model(cfg)))`; for a
        quantized checkpoint, with QuantArrays of shardings at the quantized weights
        (`jaxinfer.model_loader.param_shardings(..., spec)`).
      allow_pickle: accept `pytorch_model.bin` weights (unpickling can run code).
    """
    model_dir = Path(model_dir)
    np_dtype = to_numpy_dtype(dtype)
    quant = checkpoint_quant(model_dir)
    shapes, fixed = stored_shapes(cfg, quant)
    shardings = split_quant(shardings)
    _check_shardings(shardings, shapes)
    start = time.perf_counter()
    if is_converted(model_dir):
        params = restore_params(model_dir, shapes, dtype=np_dtype, shardings=shardings,
                                fixed_dtypes=fixed)
        spec = parse_quant(quant)
        if spec is not None:
            params = join_quant(params, quantized_weights(cfg, spec.kind), spec)
        kind = "converted" if spec is None else f"converted {quant}"
    elif (model_dir / "config.json").is_file():
        params = _load_hf(model_dir, cfg, dtype=np_dtype, shardings=shardings,
                          allow_pickle=allow_pickle)
        kind = "Hugging Face"
    else:
        raise _not_a_model_dir(model_dir)
    logger.info("loaded %s params from %s (%s) in %.1fs", kind, model_dir, np_dtype.name,
                time.perf_counter() - start)
    return params
