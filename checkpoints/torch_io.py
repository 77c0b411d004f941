"""PyTorch pickle weights (`pytorch_model.bin`), read only when the user allows pickle.

`torch.load(weights_only=True)` restricts unpickling to tensors and plain containers, but the
format is still pickle, so `checkpoints.safetensors_io.open_weights` gates this behind an
explicit opt-in. torch is imported lazily: it is not a runtime dependency of jaxinfer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from checkpoints.tensors import NUMPY_DTYPES, TensorInfo, unsupported_dtype
from jaxinfer.errors import CheckpointError

logger = logging.getLogger(__name__)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading pickle weights needs PyTorch, which is not installed "
                              "(pip install torch), or convert them to safetensors") from None
    return torch


def _dtype_name(torch: Any, dtype: Any) -> str:
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
    return names.get(dtype, str(dtype))


def _load(torch: Any, path: Path) -> dict[str, Any]:
    try:
        try:
            # mmap keeps a many-GB state dict out of RAM until a tensor is actually used.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (non-zip) format cannot be mmapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot read pickle weights ({type(e).__name__}: "
                              f"{e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


class PickleReader:
    """Tensors from one or more `torch.save`d state dicts (loaded memory-mapped)."""

    def __init__(self, torch: Any, tensors: dict[str, tuple[Path, Any]]) -> None:
        self._torch = torch
        self._tensors = tensors

    @classmethod
    def from_files(cls, files: list[Path]) -> PickleReader:
        torch = _import_torch()
        tensors: dict[str, tuple[Path, Any]] = {}
        for path in files:
            for name, tensor in _load(torch, path).items():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} is in both {tensors[name][0]} and "
                                          f"{path}")
                tensors[name] = (path, tensor)
        logger.debug("read %d tensors from %d pickle files", len(tensors), len(files))
        return cls(torch, tensors)

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise CheckpointError(f"tensor {name!r} not found in the checkpoint")
        path, t = self._tensors[name]
        nbytes = t.numel() * t.element_size()
        return TensorInfo(path, _dtype_name(self._torch, t.dtype), tuple(t.shape), 0, nbytes)

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        if info.dtype not in NUMPY_DTYPES:
            raise unsupported_dtype(name, info)
        return self._numpy(self._tensors[name][1].detach().contiguous(), info)

    def read_slice(self, name: str, rows: tuple[slice, ...]) -> np.ndarray:
        info = self.info(name)
        if info.dtype not in NUMPY_DTYPES:
            raise unsupported_dtype(name, info)
        # The state dict is memory-mapped: slicing the tensor first pages in only that part.
        return self._numpy(self._tensors[name][1].detach()[rows].contiguous(), info)

    def _numpy(self, t: Any, info: TensorInfo) -> np.ndarray:
        if info.dtype == "BF16":  # numpy has no bfloat16: reinterpret the bits
            return t.view(self._torch.int16).numpy().view(NUMPY_DTYPES["BF16"])
        return t.numpy()
