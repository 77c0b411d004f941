"""Hugging Face Llama / Mistral / Qwen2 tensors -> jaxinfer Llama parameters.

One explicit table (`tensor_map`) names, for every parameter of `jaxinfer.models.llama`, the
Hugging Face tensor it comes from, that tensor's expected shape, and the transform into our
layout. HF stores `nn.Linear` weights as [out, in]; the model wants [in, out] with the head axes
split out ([D, N, H] for q/k/v, [N, H, D] for o), so projections are transposed and reshaped.
Per-layer tensors are stacked on a leading `layers` axis (the model scans over it).

Everything is checked against the config before any data is read, so a wrong checkpoint fails
in seconds with the tensor's name, not after most of a conversion.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from checkpoints.dtypes import to_numpy_dtype
from checkpoints.safetensors_io import NUMPY_DTYPES, WeightReader, unsupported_dtype
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError

logger = logging.getLogger(__name__)

ParamPath = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]

# HF tensors that carry no weights of their own: RoPE tables older exports saved as buffers.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _in_to_heads(x: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    """q/k/v_proj.weight [heads*H, D] -> [D, heads, H]."""
    return x.T.reshape(x.shape[1], heads, head_dim)


def _bias_to_heads(x: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    """q/k/v_proj.bias [heads*H] -> [heads, H]."""
    return x.reshape(heads, head_dim)


def _heads_to_out(x: np.ndarray, *, heads: int, head_dim: int) -> np.ndarray:
    """o_proj.weight [D, N*H] -> [N, H, D]."""
    return x.T.reshape(heads, head_dim, x.shape[0])


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter and the Hugging Face tensor(s) it is built from."""

    path: ParamPath  # key path in the params pure dict, e.g. ("layers", "wq")
    hf_name: str  # "{i}" stands for the layer index of stacked parameters
    hf_shape: tuple[int, ...]  # per tensor, as stored by HF
    shape: tuple[int, ...]  # per tensor after `transform` (without the layers axis)
    transform: Transform
    num_layers: int | None = None  # set for parameters stacked over layers

    def hf_names(self) -> list[str]:
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(self.num_layers)]

    @property
    def param_shape(self) -> tuple[int, ...]:
        return self.shape if self.num_layers is None else (self.num_layers, *self.shape)


def tensor_map(cfg: ModelConfig) -> list[TensorMap]:
    """The complete HF name -> parameter table for `cfg` (order = conversion order)."""
    L, D, N, K, H, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    q = functools.partial(_in_to_heads, heads=N, head_dim=H)
    kv = functools.partial(_in_to_heads, heads=K, head_dim=H)
    attn = "model.layers.{i}.self_attn"
    mlp = "model.layers.{i}.mlp"

    def layer(name: str, hf: str, hf_shape: tuple, shape: tuple, fn: Transform) -> TensorMap:
        return TensorMap(("layers", name), hf, hf_shape, shape, fn, num_layers=L)

    table = [
        TensorMap(("embed",), "model.embed_tokens.weight", (V, D), (V, D), _identity),
        layer("attn_norm", "model.layers.{i}.input_layernorm.weight", (D,), (D,), _identity),
        layer("wq", f"{attn}.q_proj.weight", (N * H, D), (D, N, H), q),
        layer("wk", f"{attn}.k_proj.weight", (K * H, D), (D, K, H), kv),
        layer("wv", f"{attn}.v_proj.weight", (K * H, D), (D, K, H), kv),
    ]
    if cfg.attention_bias:
        q_bias = functools.partial(_bias_to_heads, heads=N, head_dim=H)
        kv_bias = functools.partial(_bias_to_heads, heads=K, head_dim=H)
        table += [
            layer("bq", f"{attn}.q_proj.bias", (N * H,), (N, H), q_bias),
            layer("bk", f"{attn}.k_proj.bias", (K * H,), (K, H), kv_bias),
            layer("bv", f"{attn}.v_proj.bias", (K * H,), (K, H), kv_bias),
        ]
    table += [
        layer("wo", f"{attn}.o_proj.weight", (D, N * H), (N, H, D),
              functools.partial(_heads_to_out, heads=N, head_dim=H)),
        layer("mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", (D,), (D,),
              _identity),
        layer("w_gate", f"{mlp}.gate_proj.weight", (F, D), (D, F), _transpose),
        layer("w_up", f"{mlp}.up_proj.weight", (F, D), (D, F), _transpose),
        layer("w_down", f"{mlp}.down_proj.weight", (D, F), (F, D), _transpose),
        TensorMap(("final_norm",), "model.norm.weight", (D,), (D,), _identity),
    ]
    if not cfg.tie_word_embeddings:
        table.append(TensorMap(("lm_head",), "lm_head.weight", (V, D), (D, V), _transpose))
    return table


def param_shapes(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter path and its full (stacked) shape."""
    return {m.path: m.param_shape for m in tensor_map(cfg)}


def check_tensors(reader: WeightReader, cfg: ModelConfig) -> None:
    """Fail before reading any data if a tensor is missing, mis-shaped or of a foreign dtype."""
    available = reader.names()
    used: set[str] = set()
    for m in tensor_map(cfg):
        for name in m.hf_names():
            if name not in available:
                raise CheckpointError(f"tensor {name!r} is missing from the checkpoint "
                                      f"(needed for {'/'.join(m.path)})")
            info = reader.info(name)
            if info.shape != m.hf_shape:
                raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)}, expected "
                                      f"{list(m.hf_shape)} ({info.file.name})")
            if info.dtype not in NUMPY_DTYPES:
                raise unsupported_dtype(name, info)
            used.add(name)
    _log_unused(sorted(available - used), cfg)


def _log_unused(unused: list[str], cfg: ModelConfig) -> None:
    """Extras are skipped; ones that look like real weights get a warning (they change logits)."""
    quiet = [n for n in unused if n.endswith(_IGNORED_SUFFIXES)
             or (cfg.tie_word_embeddings and n == "lm_head.weight")]
    loud = [n for n in unused if n not in quiet]
    if quiet:
        logger.debug("ignoring %d unused tensors: %s", len(quiet), ", ".join(quiet[:8]))
    if loud:
        logger.warning("ignoring %d tensors the model has no parameter for: %s%s", len(loud),
                       ", ".join(loud[:8]), " ..." if len(loud) > 8 else "")


def _read(reader: WeightReader, name: str, m: TensorMap) -> np.ndarray:
    x = reader.read(name)
    if tuple(x.shape) != m.hf_shape:  # a reader must agree with its own header; be sure
        raise CheckpointError(f"tensor {name!r} has shape {list(x.shape)}, expected "
                              f"{list(m.hf_shape)}")
    return m.transform(x)


def build_param(reader: WeightReader, m: TensorMap, dtype: np.dtype,
                on_tensor: Callable[[str], None] | None = None) -> np.ndarray:
    """One parameter as a host array in `dtype`, layers stacked on axis 0."""
    out = np.empty(m.param_shape, dtype=dtype)
    names = m.hf_names()
    for i, name in enumerate(names):
        # Cast while copying into the stacked buffer: one full-size copy, not two.
        value = _read(reader, name, m)
        if m.num_layers is None:
            out[...] = value.astype(dtype, copy=False)
        else:
            out[i] = value.astype(dtype, copy=False)
        if on_tensor is not None:
            on_tensor(name)
    return out


def iter_params(reader: WeightReader, cfg: ModelConfig, *, dtype: Any,
                on_tensor: Callable[[str], None] | None = None,
                ) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """Yield (path, host array in `dtype`) one parameter at a time, without `check_tensors`."""
    np_dtype = to_numpy_dtype(dtype)
    for m in tensor_map(cfg):
        yield m.path, build_param(reader, m, np_dtype, on_tensor)


def hf_params(reader: WeightReader, cfg: ModelConfig, *, dtype: Any,
              on_tensor: Callable[[str], None] | None = None,
              ) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """Check every tensor now, then yield (path, host array in `dtype`) one parameter at a time.

    Yielding keeps at most one parameter in host memory when the caller moves each to the
    devices before asking for the next. `on_tensor(hf_name)` is called after each HF tensor
    is read (progress bars).
    """
    to_numpy_dtype(dtype)
    check_tensors(reader, cfg)
    return iter_params(reader, cfg, dtype=dtype, on_tensor=on_tensor)


def num_hf_tensors(cfg: ModelConfig) -> int:
    """How many HF tensors `hf_params` reads (the length of a progress bar)."""
    return sum(len(m.hf_names()) for m in tensor_map(cfg))


def set_path(tree: dict, path: ParamPath, value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the nested dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_params_dict(reader: WeightReader, cfg: ModelConfig, *, dtype: Any,
                   on_tensor: Callable[[str], None] | None = None) -> dict:
    """All parameters as a nested pure dict of host arrays (the model's `to_pure_dict` layout)."""
    params: dict = {}
    for path, value in hf_params(reader, cfg, dtype=dtype, on_tensor=on_tensor):
        set_path(params, path, value)
    return params
