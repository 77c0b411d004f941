"""What a weight file's tensor is, before it is read: shared by the safetensors reader and the
pickle reader (`checkpoints/torch_io.py`), so neither imports the other's module for it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import ml_dtypes
import numpy as np

from jaxinfer.errors import CheckpointError

NUMPY_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# What the readers return: the float dtypes of Hugging Face weights, and the quantized ones
# jaxinfer's own converted files hold (`checkpoints.convert --quant`: int8, packed int4, fp8). Hugging Face tensors are
# still checked against NUMPY_DTYPES: an int8 tensor there is not a weight we can cast.
STORED_DTYPES: dict[str, np.dtype] = {
    **NUMPY_DTYPES,
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),  # int4 weights, two per byte
    "I32": np.dtype("<i4"),  # AWQ / GPTQ packed int4 words and GPTQ's g_idx
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}

@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is (from the file header, nothing read yet)."""

    file: Path
    dtype: str  # safetensors dtype name: "F32", "BF16", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    nbytes: int


class WeightReader(Protocol):
    """Read-only access to named tensors; `read` returns a host array in the stored dtype."""

    def names(self) -> frozenset[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> np.ndarray: ...

    def read_slice(self, name: str, rows: tuple[slice, ...]) -> np.ndarray:
        """`read(name)[rows]` (one step-1 slice per axis), reading no more than the rows of
        the first axis that `rows` covers."""
        ...


def unsupported_dtype(name: str, info: TensorInfo) -> CheckpointError:
    return CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which is not "
                           f"supported (supported: {', '.join(NUMPY_DTYPES)})")
