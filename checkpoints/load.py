"""Load a model directory (Hugging Face or converted) into sharded device arrays.

Both paths place each parameter directly into its `NamedSharding`, and neither builds a whole
parameter on the host:

- A Hugging Face directory is read per device shard. For every addressable device, the slice
  of the parameter it holds (`sharding.addressable_devices_indices_map`) is read from the
  safetensors files with `checkpoints.llama.read_region` (only the rows of each HF tensor that
  the slice needs, transposed/split on the slice) one layer at a time, and each layer is
  written into the device's buffer in place (a donated `dynamic_update_slice`). The devices'
  buffers become one array with `jax.make_array_from_single_device_arrays`. Host memory above
  what the devices keep is therefore one layer of one shard (plus, for a column slice, that
  layer's HF rows), never a stacked `[layers, ...]` weight; `jax.make_array_from_callback`
  would instead hold every addressable shard of a parameter on the host at once.
- A converted directory is restored by orbax against a sharded target (each device reads its
  own chunks; see `checkpoints/orbax_io.py` on chunk sizes).

A progress bar in bytes (tqdm, on stderr when it is a terminal) follows the Hugging Face path.

A directory converted with `--quant` holds QuantArrays (`jaxinfer/quant.py`); `load_params`
restores them as such when given the matching quantized shardings (`checkpoint_quant` says
which quantization a directory holds).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import llama
from checkpoints.dtypes import to_numpy_dtype
from checkpoints.hf_config import model_config_from_hf
from checkpoints.orbax_io import (CHECKPOINT_FILE, CONFIG_FILE, PARAMS_DIR,
                                  check_recorded_shapes, flatten, read_checkpoint_info,
                                  restore_params, unflatten)
from checkpoints.quantize import stored_shapes, stored_table
from checkpoints.safetensors_io import WeightReader, open_weights
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


# Layers are copied into a device shard one at a time, in place (the buffer is donated).
@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buf: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buf, layer, i, 0)


def _shard(reader: WeightReader, m: llama.TensorMap, index: tuple[slice, ...],
           dtype: np.dtype, device: jax.Device, bar) -> jax.Array:
    """The part `index` of parameter `m`, on `device`, read layer by layer."""
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, m.param_shape))
    if m.num_layers is None:
        host = np.asarray(llama.read_region(reader, m.hf_name, m, index), dtype=dtype)
        bar.update(host.nbytes)
        return jax.device_put(host, device)
    layers, rest = range(index[0].start, index[0].stop), index[1:]
    names = m.hf_names()
    if len(layers) == 1:
        host = np.asarray(llama.read_region(reader, names[layers[0]], m, rest), dtype=dtype)
        bar.update(host.nbytes)
        return jax.device_put(host[None], device)
    shape = (len(layers), *(s.stop - s.start for s in rest))
    buf = jnp.zeros(shape, dtype, device=device)  # made on the device, not copied there
    for j, layer in enumerate(layers):
        host = np.asarray(llama.read_region(reader, names[layer], m, rest), dtype=dtype)
        buf = _set_layer(buf, jax.device_put(host, device), np.int32(j))
        bar.update(host.nbytes)
        del host
    return buf


def _place(reader: WeightReader, m: llama.TensorMap, sharding: jax.sharding.Sharding,
           dtype: np.dtype, bar) -> jax.Array:
    shards = sharding.addressable_devices_indices_map(m.param_shape)
    arrays = [_shard(reader, m, index, dtype, device, bar) for device, index in shards.items()]
    return jax.make_array_from_single_device_arrays(m.param_shape, sharding, arrays)


def addressable_bytes(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                      dtype: np.dtype) -> int:
    """Bytes of the shards of an array this process's devices hold (replicas counted)."""
    return sum(math.prod(s.stop - s.start for s in (
        slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))) * np.dtype(dtype).itemsize
        for index in sharding.addressable_devices_indices_map(shape).values())


def _load_table(reader: WeightReader, table: list[llama.TensorMap], *, shardings: dict,
                dtypes: dict, progress: bool | None) -> dict:
    """Every parameter of `table`, placed per device shard (`_place`), in `dtypes[path]`."""
    from tqdm import tqdm

    flat_shardings = flatten(shardings)
    total = sum(addressable_bytes(m.param_shape, flat_shardings[m.path], dtypes[m.path])
                for m in table)
    flat: dict[tuple[str, ...], jax.Array] = {}
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total, desc="loading weights", unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, disable=not show) as bar:
        for m in table:
            flat[m.path] = _place(reader, m, flat_shardings[m.path], dtypes[m.path], bar)
    return unflatten(flat)


def _check_stored(reader: WeightReader, table: list[llama.TensorMap], where: Path) -> None:
    for m in table:
        for name in m.hf_names():
            if name not in reader.names():
                raise CheckpointError(f"{where}: tensor {name!r} is missing")
            info = reader.info(name)
            if info.shape != m.hf_shape:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {list(info.shape)}, "
                                      f"expected {list(m.hf_shape)}")


def load_params(model_dir: str | Path, cfg: ModelConfig, *, dtype: Any, shardings: dict,
                allow_pickle: bool = False, progress: bool | None = None) -> dict:
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
      progress: a progress bar in bytes on stderr (None: when stderr is a terminal).
    """
    model_dir = Path(model_dir)
    np_dtype = to_numpy_dtype(dtype)
    quant = checkpoint_quant(model_dir)
    shapes, fixed = stored_shapes(cfg, quant)
    shardings = split_quant(shardings)
    _check_shardings(shardings, shapes)
    start = time.perf_counter()
    info = read_checkpoint_info(model_dir) if is_converted(model_dir) else None
    if info is not None and info.params_format == "safetensors":
        check_recorded_shapes(info, shapes, model_dir / CHECKPOINT_FILE)
        params_dir = model_dir / PARAMS_DIR
        table = stored_table(cfg, quant)
        reader = open_weights(params_dir)
        _check_stored(reader, table, params_dir)
        params = _load_table(reader, table, shardings=shardings, progress=progress,
                             dtypes={m.path: fixed.get(m.path, np_dtype) for m in table})
    elif is_converted(model_dir):
        params = restore_params(model_dir, shapes, dtype=np_dtype, shardings=shardings,
                                fixed_dtypes=fixed)
    if is_converted(model_dir):
        spec = parse_quant(quant)
        if spec is not None:
            params = join_quant(params, quantized_weights(cfg, spec.kind), spec)
        kind = "converted" if spec is None else f"converted {quant}"
    elif (model_dir / "config.json").is_file():
        reader = open_weights(model_dir, allow_pickle=allow_pickle)
        llama.check_tensors(reader, cfg)
        table = llama.tensor_map(cfg)
        params = _load_table(reader, table, shardings=shardings, progress=progress,
                             dtypes={m.path: np_dtype for m in table})
        kind = "Hugging Face"
    else:
        raise _not_a_model_dir(model_dir)
    logger.info("loaded %s params from %s (%s) in %.1fs", kind, model_dir, np_dtype.name,
                time.perf_counter() - start)
    return params
