"""Write safetensors files piece by piece: the streaming half of `checkpoints.convert`.

Every tensor's name, dtype and shape are known before any data is read (from the model config),
so `StreamWriter` lays out the files first: headers written, each file sized, every tensor's
byte range fixed. Data then arrives in any order and in any rectangular pieces (`write(name,
index, x)`), each piece going to its place with positioned writes (`os.pwrite`) of its
contiguous runs. The writer holds no tensor data itself, so a conversion's host memory is the
piece in hand, never a whole model or a whole stacked weight.

Files are split like Hugging Face's (`model-00001-of-00003.safetensors` plus a
`model.safetensors.index.json`) so that `checkpoints.safetensors_io.open_weights` reads them
back unchanged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from checkpoints.tensors import STORED_DTYPES
from jaxinfer.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
_NAMES = {np.dtype(d): name for name, d in STORED_DTYPES.items()}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):  # one call writes at most ~2 GiB on Linux
        done += os.pwrite(fd, data[done:], offset + done)


class StreamWriter:
    """Tensors `[(name, dtype, shape), ...]` laid out in files of at most `max_file_bytes`
    (a tensor larger than that gets a file of its own), written piece by piece."""

    def __init__(self, out_dir: str | Path, tensors: list[tuple[str, np.dtype, tuple[int, ...]]],
                 *, max_file_bytes: int = 4 << 30) -> None:
        self.out_dir = Path(out_dir)
        groups: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if groups[-1] and size + nbytes > max_file_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, np.dtype(dtype), tuple(shape)))
            size += nbytes
        self._where: dict[str, tuple[int, int, np.dtype, tuple[int, ...]]] = {}
        self._fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for k, group in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            header: dict = {}
            offset = 0
            for name, dtype, shape in group:
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
            fd = os.open(self.out_dir / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + offset)  # every byte range exists from now on
            start = 8 + len(raw)
            for name, dtype, shape in group:
                self._where[name] = (fd, start + header[name]["data_offsets"][0], dtype, shape)
                self.weight_map[name] = file
            self.total_bytes += offset

    def write(self, name: str, index: tuple[slice, ...], x: np.ndarray) -> None:
        """Write `x` as `tensor[index]` (step-1 slices, one per axis)."""
        fd, base, dtype, shape = self._where[name]
        starts = [s.indices(n)[0] for s, n in zip(index, shape)]
        if x.dtype != dtype or x.ndim != len(shape) or any(
                a + d > n for a, d, n in zip(starts, x.shape, shape)):
            raise CheckpointError(f"{name}: piece {x.dtype}{list(x.shape)} at {starts} does not "
                                  f"fit {dtype}{list(shape)}")
        x = np.ascontiguousarray(x)
        flat = memoryview(x.reshape(-1).view(np.uint8))
        if not shape:
            _pwrite_all(fd, flat, base)
            return
        strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
        # Axes after the last partial one are whole, so each x[i0, ..., i_{j-1}] is one run.
        partial = [a for a in range(len(shape)) if x.shape[a] != shape[a]]
        j = partial[-1] if partial else 0
        run = math.prod(x.shape[j:]) * dtype.itemsize
        for n, idx in enumerate(np.ndindex(*x.shape[:j])):
            elem = sum((starts[a] + idx[a]) * strides[a] for a in range(j)) + starts[j] * strides[j]
            _pwrite_all(fd, flat[n * run:(n + 1) * run], base + elem * dtype.itemsize)

    def close(self) -> None:
        """Flush the files and write the index (the files are complete only after this)."""
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n",
                                               encoding="utf-8")
