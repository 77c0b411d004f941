"""The parameter dtypes a checkpoint can be loaded or converted to."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from jaxinfer.errors import ConfigError

PARAM_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """"bfloat16" / np.float16 / jnp.float32 ... -> a numpy dtype from PARAM_DTYPES."""
    if isinstance(dtype, str):
        if dtype not in PARAM_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(PARAM_DTYPES)}, got {dtype!r}")
        return PARAM_DTYPES[dtype]
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"not a dtype: {dtype!r}") from None
    if np_dtype not in PARAM_DTYPES.values():
        raise ConfigError(f"dtype must be one of {', '.join(PARAM_DTYPES)}, got {np_dtype}")
    return np_dtype


def dtype_name(dtype: Any) -> str:
    """The PARAM_DTYPES key of `dtype` ("bfloat16", ...)."""
    return to_numpy_dtype(dtype).name
