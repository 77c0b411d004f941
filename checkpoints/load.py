"""Load a model directory (Hugging Face or converted) into sharded device arrays.

Each parameter goes straight into its `NamedSharding`, read per device shard, and no whole
parameter is ever built on the host (docs/loading.md):

- For every addressable device, the slice of the parameter it holds
  (`sharding.addressable_devices_indices_map`) is read in pieces: one layer of a stacked
  weight at a time, cut further when large, each piece one contiguous row range of one
  safetensors tensor (`checkpoints.llama.read_rows`: only the rows that device needs). Each
  piece is copied to the device as read, then transposed, cast and written into the device's
  buffer in place (a jitted, donated `dynamic_update_slice`), and waited for before the next
  read. The devices' buffers become one array with `jax.make_array_from_single_device_arrays`.
  Host memory above what the devices keep is therefore about one piece, never a stacked
  `[layers, ...]` weight (`jax.make_array_from_callback` would hold every addressable shard
  of a parameter on the host at once).
- Hugging Face directories and directories converted by `checkpoints.convert` (safetensors in
  our own layout, `checkpoints.quantize.stored_table`) go through that same path; only the name
  table differs. Older converted directories (orbax, format 1) are restored by orbax against a
  sharded target.

A progress bar in bytes (tqdm, on stderr when it is a terminal) follows the reads.

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

from checkpoints import awq_gptq, llama
from checkpoints.dtypes import to_numpy_dtype
from checkpoints.hf_config import model_config_from_hf
from checkpoints.orbax_io import (CHECKPOINT_FILE, CONFIG_FILE, PARAMS_DIR, check_recorded_shapes,
                                  flatten, read_checkpoint_info, restore_params, unflatten)
from checkpoints.quantize import stored_shapes, stored_table
from checkpoints.safetensors_io import WeightReader, open_weights
from checkpoints.tensors import STORED_DTYPES
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
    """The quantization a model directory holds: "none" for float ones, "int4-g128" for AWQ
    and GPTQ Hugging Face checkpoints (`checkpoints/awq_gptq.py`)."""
    if not is_converted(model_dir):
        return "int4-g128" if awq_gptq.read_format(model_dir) is not None else "none"
    info = read_checkpoint_info(model_dir)
    return "none" if info is None else info.quant


def checkpoint_g_idx_paths(model_dir: str | Path) -> frozenset[tuple[str, ...]]:
    """The quantized weights that keep per-row groups (GPTQ act-order checkpoints)."""
    fmt = None if is_converted(model_dir) else awq_gptq.read_format(model_dir)
    return frozenset() if fmt is None else fmt.g_idx_paths


def _check_shardings(shardings: dict, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> None:
    given = set(flatten(shardings))
    missing = sorted("/".join(p) for p in set(shapes) - given)
    extra = sorted("/".join(p) for p in given - set(shapes))
    if missing or extra:
        raise ConfigError(f"shardings do not match the model config's parameters "
                          f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})")


# Pieces are written into a device's buffer in place (it is donated), transposed and cast on
# the device: the host holds only the rows read, never a transposed or cast copy.
@functools.partial(jax.jit, static_argnames=("perm", "stacked"), donate_argnums=0)
def _put_piece(buf: jax.Array, rows: jax.Array, starts: tuple, *, perm: tuple[int, ...],
               stacked: bool) -> jax.Array:
    piece = jnp.transpose(rows, perm).astype(buf.dtype)
    return jax.lax.dynamic_update_slice(buf, piece[None] if stacked else piece, starts)


@functools.lru_cache(maxsize=256)
def _zeros(shape: tuple[int, ...], dtype: np.dtype, device: jax.Device):
    """A program that makes a zero buffer on `device` itself. `jnp.zeros(..., device=)` and
    `device_put(np.zeros(...))` both pass through a host-side buffer of the same size."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


_SMALL_SHARD = 1 << 20  # bytes; smaller shards skip the on-device assembly


def _piece_limit(shard_bytes: int) -> int:
    """Bytes read per piece of a device's shard (the transient stays small beside what the
    device keeps)."""
    return llama.piece_bytes(shard_bytes)


def _shard(reader: WeightReader, m: llama.TensorMap, index: tuple[slice, ...],
           dtype: np.dtype, device: jax.Device, bar) -> jax.Array:
    """The part `index` of parameter `m`, on `device`, written piece by piece.

    A piece is one layer (for a stacked parameter), cut further along the axis HF's row axis
    becomes when it is larger than `_piece_limit`, so that each piece is one contiguous row
    range of one HF tensor. Every piece is waited for before the next is read: JAX dispatches
    asynchronously and keeps each host buffer alive until its copy has run.
    """
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, m.param_shape))
    shape = tuple(s.stop - s.start for s in index)
    stacked = m.num_layers is not None
    layers = range(index[0].start, index[0].stop) if stacked else [None]
    rest = index[1:] if stacked else index
    names = m.hf_names()
    itemsize = np.dtype(dtype).itemsize
    if math.prod(shape) * itemsize <= _SMALL_SHARD:
        # Small: assembled on the host and copied once (no per-device program to compile;
        # the transient is at most twice _SMALL_SHARD).
        host = np.empty(shape, dtype)
        for j, layer in enumerate(layers):
            host[j if stacked else ...] = llama.read_region(
                reader, names[layer] if stacked else names[0], m, rest)
        bar.update(host.nbytes)
        return jax.device_put(host, device).block_until_ready()
    buf = _zeros(shape, np.dtype(dtype), device)().block_until_ready()
    k = m.perm.index(0)  # our axis fed by HF axis 0's outermost factor
    rest_shape = tuple(s.stop - s.start for s in rest)
    row_bytes = math.prod(rest_shape) // rest_shape[k] * itemsize  # one index along axis k
    step = max(1, _piece_limit(math.prod(shape) * itemsize) // row_bytes)
    for j, layer in enumerate(layers):
        name = names[layer] if stacked else names[0]
        for a in range(rest[k].start, rest[k].stop, step):
            region = (*rest[:k], slice(a, min(a + step, rest[k].stop)), *rest[k + 1:])
            rows = llama.read_rows(reader, name, m, region)
            starts = [0] * len(shape)
            starts[k + stacked] = a - rest[k].start
            starts[0] = j if stacked else starts[0]
            buf = _put_piece(buf, jax.device_put(rows, device),
                             tuple(np.int32(x) for x in starts), perm=m.perm, stacked=stacked)
            buf.block_until_ready()
            bar.update(rows.size * itemsize)
            del rows
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
    int4_format = None if is_converted(model_dir) else awq_gptq.read_format(model_dir)
    g_idx_paths = frozenset() if int4_format is None else int4_format.g_idx_paths
    shapes, fixed = stored_shapes(cfg, quant, g_idx_paths)
    shardings = split_quant(shardings)
    _check_shardings(shardings, shapes)
    start = time.perf_counter()
    info = read_checkpoint_info(model_dir) if is_converted(model_dir) else None
    if info is not None and info.params_format == "safetensors":
        check_recorded_shapes(info, shapes, model_dir / CHECKPOINT_FILE)
        params_dir = model_dir / PARAMS_DIR
        table = stored_table(cfg, quant)
        reader = open_weights(params_dir)
        llama.check_table(reader, table, STORED_DTYPES)  # quantized ones hold int8 and fp8
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
    elif int4_format is not None:  # AWQ / GPTQ: float tensors as usual, int4 ones unpacked
        reader = open_weights(model_dir, allow_pickle=allow_pickle)
        spec = parse_quant(quant)
        layout = quantized_weights(cfg, spec.kind)
        table = [m for m in llama.tensor_map(cfg) if m.path not in layout]
        llama.check_table(reader, table)
        params = _load_table(reader, table, shardings=shardings, progress=progress,
                             dtypes={m.path: np_dtype for m in table})
        flat = flatten(params)
        flat.update(awq_gptq.load_int4(reader, cfg, int4_format, shardings))
        params = join_quant(unflatten(flat), layout, spec)
        kind = f"{int4_format.method} int4"
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
