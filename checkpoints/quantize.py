"""The offline quantization pass of `checkpoints.convert --quant` (STYLE.md rule 19).

Each weight the model quantizes (`jaxinfer.models.llama.quantized_weights`) is read from the
Hugging Face tensors as float32, quantized on the host CPU device with `jaxinfer.quant`, and
stored as entries `<path>/q` and `<path>/scale` (int4 also `<path>/zero`); every other parameter is stored in
the checkpoint dtype. `stored_shapes` is the one description of that layout: the converter
records it in `jaxinfer_checkpoint.json` and the loader restores against it.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import llama
from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import quantized_weights
from jaxinfer.quant import QuantSpec, parse_quant, quantize, quantized_structs, split_quant

logger = logging.getLogger(__name__)

ParamPath = tuple[str, ...]


def layout(cfg: ModelConfig, quant: str) -> dict[ParamPath, tuple[int, int]]:
    """The weights `quant` replaces: path -> (stacked dims, contraction dims); {} for none."""
    spec = parse_quant(quant)
    return {} if spec is None else quantized_weights(cfg, spec.kind)


def stored_shapes(cfg: ModelConfig, quant: str, g_idx_paths: frozenset = frozenset()
                  ) -> tuple[dict[ParamPath, tuple[int, ...]], dict[ParamPath, np.dtype]]:
    """({flat path: shape}, {flat path: dtype} of the quantized entries) of a checkpoint
    converted with `quant` ("none": the float parameters, no fixed dtypes); `g_idx_paths`:
    the weights with per-row groups (GPTQ act-order, `checkpoints.awq_gptq`)."""
    shapes = llama.param_shapes(cfg)
    spec = parse_quant(quant)
    if spec is None:
        return shapes, {}
    weights = quantized_weights(cfg, spec.kind)
    structs = quantized_structs(shapes, weights, spec, g_idx_paths)
    out = {p: s for p, s in shapes.items() if p not in weights}
    out.update({p: tuple(s.shape) for p, s in structs.items()})
    return out, {p: np.dtype(s.dtype) for p, s in structs.items()}


def quantize_host(value: np.ndarray, spec: QuantSpec, *, batch: int, contract: int
                  ) -> dict[str, jax.Array]:
    """The stored parts of a host weight's QuantArray ({"q", "scale"}, int4 also "zero";
    `jaxinfer.quant.split_quant`), computed on the CPU device so they stay in host memory."""
    with jax.default_device(jax.devices("cpu")[0]):
        qa = quantize(jnp.asarray(value, jnp.float32), spec, batch=batch, contract=contract)
    return split_quant(qa)


def stored_table(cfg: ModelConfig, quant: str) -> list[llama.TensorMap]:
    """The tensors of a converted (safetensors) checkpoint as `llama.TensorMap`s in our own
    layout (identity transforms): `embed`, `lm_head/q`, ... whole; stacked parameters as one
    tensor per layer, `layers/wq/0`, `layers/wq/1`, ..., so that conversion writes, and a
    loader reads, one layer at a time. Read with `checkpoints.load`, as Hugging Face tensors
    are."""
    shapes, _ = stored_shapes(cfg, quant)
    table = []
    for path, shape in shapes.items():
        stacked = path[0] == "layers"  # every stacked parameter lives under layers/
        per = tuple(shape[1:]) if stacked else tuple(shape)
        table.append(llama.TensorMap(
            path, "/".join(path) + ("/{i}" if stacked else ""), per,
            tuple((d,) for d in per), tuple(range(len(per))),
            num_layers=shape[0] if stacked else None))
    return table
