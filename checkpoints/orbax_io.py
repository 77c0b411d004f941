"""The converted checkpoint format: params plus two small JSON files.

    <dir>/params/                   the parameters (below)
    <dir>/jaxinfer_config.json      ModelConfig.to_json()
    <dir>/jaxinfer_checkpoint.json  {"format_version", "dtype", "quant", "params_format",
                                     "params": {path: shape}}

Two forms of `params/`, told apart by `params_format`:

- "safetensors" (format_version 2, what `checkpoints.convert` writes): safetensors files in
  our own layout (`checkpoints.quantize.stored_table`: `embed`, `layers/wq/0`, ...; one tensor
  per layer of a stacked weight), plus `model.safetensors.index.json`. Written piece by piece
  (`checkpoints/safetensors_write.py`) and read per device shard by `checkpoints.load`, like a
  Hugging Face directory. Orbax could do neither within the memory bounds of docs/loading.md:
  its save takes a whole array (so a stacked `[layers, ...]` weight in host memory), and it
  holds about twice an array's bytes while writing it.
- "orbax" (format_version 1, earlier conversions; still loaded): one orbax StandardCheckpointer
  tree of the params pure dict, restored against a target tree of
  `jax.ShapeDtypeStruct(..., sharding=...)` so each device reads its own shards.

A quantized checkpoint (`quant` other than "none", see `jaxinfer/quant.py`) stores each
quantized weight as two entries, `<path>/q` (int8 or float8_e4m3fn) and `<path>/scale`
(float32); they are restored in their stored dtypes, never cast. Orbax is the part of the
stack most likely to change between versions, so all calls into it are in `_orbax_save` and
`_orbax_restore`, using only its long-stable StandardCheckpointer API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints.dtypes import dtype_name, to_numpy_dtype
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.quant import parse_quant

logger = logging.getLogger(__name__)

PARAMS_DIR = "params"
CONFIG_FILE = "jaxinfer_config.json"
CHECKPOINT_FILE = "jaxinfer_checkpoint.json"
FORMAT_VERSION = 2


def _orbax_save(path: Path, tree: Any) -> None:
    import orbax.checkpoint as ocp  # imported here: it is slow and only needed for orbax dirs

    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()  # save is asynchronous
    finally:
        ckptr.close()


def _orbax_restore(path: Path, target: Any) -> Any:
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(path, target)
    finally:
        ckptr.close()


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested pure dict -> {("layers", "wq"): leaf, ...}."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """What `jaxinfer_checkpoint.json` records about the stored params."""

    dtype: str  # "bfloat16" | "float16" | "float32"
    quant: str = "none"
    # "orbax" (format 1: one orbax tree under params/) or "safetensors" (format 2, what
    # `checkpoints.convert` writes: params/*.safetensors, one tensor per layer, streamed)
    params_format: str = "orbax"
    format_version: int = FORMAT_VERSION
    params: dict[str, list[int]] | None = None  # "layers/wq" -> shape

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def write_checkpoint_info(out_dir: str | Path, info: CheckpointInfo) -> None:
    path = Path(out_dir) / CHECKPOINT_FILE
    path.write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")


def read_checkpoint_info(model_dir: str | Path) -> CheckpointInfo | None:
    """The checkpoint's info, or None for a dir written without one."""
    path = Path(model_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = CheckpointInfo(**data)
        to_numpy_dtype(info.dtype)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({_one_line(e)})") from None
    except ValueError as e:  # ConfigError from an unknown dtype name
        raise CheckpointError(f"{path}: {e}") from None
    if info.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {info.format_version} is newer than this "
                              f"jaxinfer reads ({FORMAT_VERSION}); upgrade jaxinfer")
    if info.params_format not in ("orbax", "safetensors"):
        raise CheckpointError(f"{path}: unknown params_format {info.params_format!r}")
    try:
        parse_quant(info.quant)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return info


def to_host_array(x: np.ndarray) -> jax.Array:
    """A numpy array as a single-device CPU jax.Array (host memory, even on a GPU machine).

    Orbax's jax.Array handler is the save path it keeps stable across versions.
    """
    return jax.device_put(x, jax.devices("cpu")[0])


def save_params(out_dir: str | Path, params: dict) -> None:
    """Write a params pure dict (host or device arrays) as orbax under `out_dir/params`."""
    path = Path(out_dir).resolve() / PARAMS_DIR
    if path.exists():
        raise CheckpointError(f"{path}: already exists")
    tree = jax.tree.map(lambda x: to_host_array(x) if isinstance(x, np.ndarray) else x, params)
    try:
        _orbax_save(path, tree)
    except Exception as e:  # noqa: BLE001 - surface any orbax failure as a one-line error
        raise CheckpointError(f"{path}: cannot write orbax params ({_one_line(e)})") from e
    logger.info("wrote %s", path)


def check_recorded_shapes(info: CheckpointInfo, expected: dict, where: Path) -> None:
    """Compare the recorded shapes with the config's, so a mismatch names the parameter."""
    if info.params is None:
        return
    stored = {tuple(k.split("/")): tuple(v) for k, v in info.params.items()}
    for path, shape in expected.items():
        name = "/".join(path)
        if path not in stored:
            raise CheckpointError(f"{where}: parameter {name!r} is missing")
        if stored[path] != tuple(shape):
            raise CheckpointError(f"{where}: parameter {name!r} has shape {list(stored[path])}, "
                                  f"expected {list(shape)}")
    extra = sorted("/".join(p) for p in set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: parameters {extra} do not belong to this model config")


def restore_params(model_dir: str | Path, shapes: dict[tuple[str, ...], tuple[int, ...]], *,
                   dtype: Any, shardings: dict,
                   fixed_dtypes: dict[tuple[str, ...], Any] | None = None) -> dict:
    """Restore `model_dir/params` straight into `shardings`, cast to `dtype`.

    Args:
      shapes: expected shape of every parameter, keyed by path (from the model config).
      dtype: parameter dtype wanted.
      shardings: pure dict of NamedSharding, the same structure as the params.
      fixed_dtypes: paths restored in exactly this dtype and never cast (quantized weights
        and their scales).
    """
    fixed = {p: np.dtype(d) for p, d in (fixed_dtypes or {}).items()}
    model_dir = Path(model_dir).resolve()
    path = model_dir / PARAMS_DIR
    if not path.is_dir():
        raise CheckpointError(f"{model_dir}: no {PARAMS_DIR}/ directory (not a converted "
                              "checkpoint, or the conversion did not finish)")
    want = to_numpy_dtype(dtype)
    info = read_checkpoint_info(model_dir)
    if info is not None:
        check_recorded_shapes(info, shapes, model_dir / CHECKPOINT_FILE)
    # Restore in the stored dtype and cast here: how orbax casts on restore has changed across
    # versions; a cast in JAX is the same everywhere. Without info, ask orbax for `dtype`.
    stored = to_numpy_dtype(info.dtype) if info else want
    flat_shardings = flatten(shardings)
    target = unflatten({p: jax.ShapeDtypeStruct(shapes[p], fixed.get(p, stored), sharding=s)
                        for p, s in flat_shardings.items()})
    try:
        restored = _orbax_restore(path, target)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "unreadable"
        raise CheckpointError(f"{path}: cannot restore orbax params ({_one_line(e)})") from e
    if stored == want:
        return restored
    logger.info("casting params from %s to %s", dtype_name(stored), dtype_name(want))
    flat = flatten(restored)
    for p, x in flat.items():
        if p in fixed:
            continue
        cast = jax.jit(lambda a: a.astype(want), out_shardings=flat_shardings[p])
        flat[p] = cast(x)
        x.delete()  # free the stored-dtype copy before casting the next parameter
    return unflatten(flat)
