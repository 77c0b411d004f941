"""Lazy, validated access to a Hugging Face directory's weight files.

`open_weights(model_dir)` finds the weights (`model.safetensors`, a sharded
`model.safetensors.index.json`, or any `*.safetensors`; pickle files only with `allow_pickle`)
and returns a `WeightReader`: tensor names, shapes and dtypes come from the headers alone, and
`read(name)` loads one tensor into host memory. Headers are parsed here, not by the safetensors
package, so truncated files are caught when the directory is opened (every tensor's byte range
must lie inside its file) and BF16 is returned as `ml_dtypes.bfloat16` arrays, which numpy cannot
express natively.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

import numpy as np

from checkpoints.tensors import (NUMPY_DTYPES, STORED_DTYPES, TensorInfo, WeightReader,
                                 unsupported_dtype)
from jaxinfer.errors import CheckpointError

__all__ = ["NUMPY_DTYPES", "TensorInfo", "WeightReader", "open_weights", "read_header",
           "unsupported_dtype"]

logger = logging.getLogger(__name__)

# Byte widths of every safetensors dtype, so offsets can be validated even for tensors we
# would never read (an extra int64 buffer in the file must not make it unreadable).
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; larger means a corrupt file
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; the data is not read."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated (only {size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header length "
                                      f"{header_len} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < header_len:
        raise CheckpointError(f"{path}: truncated (header needs {header_len} bytes, file has "
                              f"{size - 8})")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} {dtype}{list(shape)} "
                                  f"does not fit its byte range [{begin}, {end})")
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {end} of the data "
                f"section but the file holds only {max(data_len, 0)}")
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return tensors


class SafetensorsReader:
    """Tensors from one or more safetensors files (headers parsed eagerly, data lazily)."""

    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self._tensors = tensors

    @classmethod
    def from_files(cls, files: list[Path]) -> SafetensorsReader:
        tensors: dict[str, TensorInfo] = {}
        for path in files:
            for name, info in read_header(path).items():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} is in both {tensors[name].file} and "
                                          f"{path}")
                tensors[name] = info
        return cls(tensors)

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in the checkpoint") from None

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        if info.dtype not in STORED_DTYPES:
            raise unsupported_dtype(name, info)
        try:
            with open(info.file, "rb") as f:
                f.seek(info.start)
                buf = f.read(info.nbytes)
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read ({e.strerror or e})") from None
        if len(buf) != info.nbytes:  # the file shrank after it was opened
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return np.frombuffer(buf, dtype=STORED_DTYPES[info.dtype]).reshape(info.shape)

    def read_slice(self, name: str, rows: tuple[slice, ...]) -> np.ndarray:
        """One contiguous byte range (the rows of axis 0 that `rows` covers) is read; the other
        axes are sliced in memory, so host memory holds that range and the result."""
        info = self.info(name)
        if info.dtype not in STORED_DTYPES:
            raise unsupported_dtype(name, info)
        if not info.shape:
            return self.read(name)
        dtype = STORED_DTYPES[info.dtype]
        start, stop, _ = rows[0].indices(info.shape[0])
        stop = max(stop, start)
        row_bytes = math.prod(info.shape[1:]) * dtype.itemsize
        nbytes = (stop - start) * row_bytes
        # Read straight into the array (no bytes object in between); one read call returns at
        # most ~2 GiB on Linux, so loop.
        x = np.empty((stop - start, *info.shape[1:]), dtype=dtype)
        view, done = memoryview(x.reshape(-1).view(np.uint8)), 0
        try:
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.start + start * row_bytes)
                while done < nbytes:
                    n = f.readinto(view[done:])
                    if not n:  # the file shrank after it was opened
                        raise CheckpointError(f"{info.file}: truncated while reading tensor "
                                              f"{name!r}")
                    done += n
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read ({e.strerror or e})") from None
        rest = rows[1:]
        if all(r == slice(None) or r.indices(d) == (0, d, 1)
               for r, d in zip(rest, info.shape[1:])):
            return x
        return np.ascontiguousarray(x[(slice(None), *rest)])


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a `*.index.json`."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: unreadable index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to file names")
    return weight_map


def shard_paths(index_path: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shard files of an index, each checked to exist."""
    paths = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {path.name} is missing")
    return paths


def _safetensors_index(index_path: Path) -> SafetensorsReader:
    weight_map = read_weight_map(index_path)
    reader = SafetensorsReader.from_files(shard_paths(index_path, weight_map))
    names = reader.names()
    for name, file in weight_map.items():
        if name not in names or reader.info(name).file.name != file:
            raise CheckpointError(f"{index_path}: tensor {name!r} is not in shard {file}")
    return reader


def _pickle_files(model_dir: Path) -> list[Path]:
    index = model_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        return shard_paths(index, read_weight_map(index))
    single = model_dir / "pytorch_model.bin"
    if single.is_file():
        return [single]
    return sorted(model_dir.glob("pytorch_model*.bin")) or sorted(model_dir.glob("*.pt"))


def open_weights(model_dir: str | Path, *, allow_pickle: bool = False) -> WeightReader:
    """Open the weights of a Hugging Face model directory.

    Safetensors are preferred when both formats are present. Pickle weights (`.bin`, `.pt`)
    can run arbitrary code when loaded, so they are refused unless `allow_pickle`.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such directory")
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return SafetensorsReader.from_files([model_dir / SAFETENSORS_SINGLE])
    if (model_dir / SAFETENSORS_INDEX).is_file():
        return _safetensors_index(model_dir / SAFETENSORS_INDEX)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        logger.debug("%s: no %s or index; reading %d safetensors files", model_dir,
                     SAFETENSORS_SINGLE, len(files))
        return SafetensorsReader.from_files(files)
    pickles = _pickle_files(model_dir)
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{model_dir}: pickle weights ({pickles[0].name}) can run arbitrary code; "
                "pass --allow-pickle to load them")
        from checkpoints.torch_io import PickleReader  # torch is optional; import only here

        return PickleReader.from_files(pickles)
    raise CheckpointError(f"{model_dir}: no weights found (expected model.safetensors, "
                          f"{SAFETENSORS_INDEX}, *.safetensors or pytorch_model.bin)")
