"""Hugging Face Llama / Mistral / Qwen2 tensors -> jaxinfer Llama parameters.

One explicit table (`tensor_map`) names, for every parameter of `jaxinfer.models.llama`, the
Hugging Face tensor it comes from, that tensor's expected shape, and the transform into our
layout. HF stores `nn.Linear` weights as [out, in]; the model wants [in, out] with the head axes
split out ([D, N, H] for q/k/v, [N, H, D] for o), so projections are transposed and reshaped.
Per-layer tensors are stacked on a leading `layers` axis (the model scans over it). Each
transform is a reshape and a transpose written as data (`TensorMap.split`, `.perm`), so that
`read_region` can produce any rectangular slice of a parameter from one row range of each HF
tensor: the loader reads per device shard, never a whole stacked weight
(`checkpoints/load.py`).

Everything is checked against the config before any data is read, so a wrong checkpoint fails
in seconds with the tensor's name, not after most of a conversion.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from checkpoints.dtypes import to_numpy_dtype
from checkpoints.safetensors_io import NUMPY_DTYPES, WeightReader, unsupported_dtype
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError

logger = logging.getLogger(__name__)

ParamPath = tuple[str, ...]

# HF tensors that carry no weights of their own: RoPE tables older exports saved as buffers.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter and the Hugging Face tensor(s) it is built from.

    The transform from an HF tensor to the parameter (per layer) is a reshape then a transpose:
    HF axis j is split into the factors `split[j]` (outermost first), and the split axes are
    permuted by `perm` (parameter axis k is split axis `perm[k]`, as `np.transpose`). Written
    as data rather than as a function so that any rectangular slice of the parameter maps back
    to one row range of the HF tensor plus in-memory slicing (`read_region`): a process reads
    only the parts of each tensor its devices hold.
    """

    path: ParamPath  # key path in the params pure dict, e.g. ("layers", "wq")
    hf_name: str  # "{i}" stands for the layer index of stacked parameters
    hf_shape: tuple[int, ...]  # per tensor, as stored by HF
    split: tuple[tuple[int, ...], ...]  # each HF axis as its factors, outermost first
    perm: tuple[int, ...]  # parameter axes as split axes
    num_layers: int | None = None  # set for parameters stacked over layers

    def __post_init__(self) -> None:
        assert tuple(math.prod(g) for g in self.split) == self.hf_shape, self
        assert sorted(self.perm) == list(range(sum(map(len, self.split)))), self

    def hf_names(self) -> list[str]:
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(self.num_layers)]

    @property
    def shape(self) -> tuple[int, ...]:
        """Per tensor, after the transform (without the layers axis)."""
        flat = [d for g in self.split for d in g]
        return tuple(flat[p] for p in self.perm)

    @property
    def param_shape(self) -> tuple[int, ...]:
        return self.shape if self.num_layers is None else (self.num_layers, *self.shape)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """A whole HF tensor -> the parameter's layout."""
        return x.reshape([d for g in self.split for d in g]).transpose(self.perm)


def _plain(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple((d,) for d in shape)


def read_rows(reader: WeightReader, name: str, m: TensorMap,
              index: tuple[slice, ...]) -> np.ndarray:
    """What `read_region` reads, before its transpose: HF tensor `name` reshaped to
    `m.split`'s axes and sliced to `index` (given on `m.shape`, mapped back through `m.perm`).

    `index` holds one step-1 slice per axis of `m.shape`. Each HF axis maps to its outermost
    split factor's range (times the inner factors); inner factors are sliced after the read
    (in practice they are head_dim, never sharded, so nothing extra is read). The result is
    contiguous when no inner factor is sliced (it is the read buffer itself).
    """
    flat = [d for g in m.split for d in g]
    wanted: list[tuple[int, int]] = [(0, 0)] * len(flat)
    for k, p in enumerate(m.perm):
        start, stop, step = index[k].indices(flat[p])
        if step != 1:
            raise ValueError(f"strided index {index[k]} into {'/'.join(m.path)}")
        wanted[p] = (start, stop)
    rows, shape, inner, pos = [], [], [], 0
    for group in m.split:
        below = math.prod(group[1:])
        (a, b), rest = wanted[pos], wanted[pos + 1:pos + len(group)]
        rows.append(slice(a * below, b * below))
        shape += [b - a, *group[1:]]
        inner += [slice(None)] + [slice(lo, hi) for lo, hi in rest]
        pos += len(group)
    x = reader.read_slice(name, tuple(rows))
    if tuple(x.shape) != tuple(r.stop - r.start for r in rows):  # a reader must agree
        raise CheckpointError(f"tensor {name!r}: read {list(x.shape)} for rows {rows}")
    return x.reshape(shape)[tuple(inner)]


def read_region(reader: WeightReader, name: str, m: TensorMap,
                index: tuple[slice, ...]) -> np.ndarray:
    """`m.transform(reader.read(name))[index]`, reading only the HF rows it needs (a
    transposed view of `read_rows`)."""
    return read_rows(reader, name, m, index).transpose(m.perm)


def tensor_map(cfg: ModelConfig) -> list[TensorMap]:
    """The complete HF name -> parameter table for `cfg` (order = conversion order)."""
    L, D, N, K, H, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    attn = "model.layers.{i}.self_attn"
    mlp = "model.layers.{i}.mlp"
    # HF nn.Linear weights are [out, in]: projections are transposed, heads split out.
    def in_to_heads(n: int) -> tuple:  # q/k/v_proj.weight [n*H, D] -> [D, n, H]
        return ((n, H), (D,)), (2, 0, 1)

    def transpose(out: int, inp: int) -> tuple:  # [out, in] -> [in, out]
        return ((out,), (inp,)), (1, 0)

    def layer(name: str, hf: str, hf_shape: tuple, layout: tuple) -> TensorMap:
        return TensorMap(("layers", name), hf, hf_shape, *layout, num_layers=L)

    def same(shape: tuple) -> tuple:
        return _plain(shape), tuple(range(len(shape)))

    table = [
        TensorMap(("embed",), "model.embed_tokens.weight", (V, D), *same((V, D))),
        layer("attn_norm", "model.layers.{i}.input_layernorm.weight", (D,), same((D,))),
        layer("wq", f"{attn}.q_proj.weight", (N * H, D), in_to_heads(N)),
        layer("wk", f"{attn}.k_proj.weight", (K * H, D), in_to_heads(K)),
        layer("wv", f"{attn}.v_proj.weight", (K * H, D), in_to_heads(K)),
    ]
    if cfg.attention_bias:  # [n*H] -> [n, H]
        table += [
            layer("bq", f"{attn}.q_proj.bias", (N * H,), (((N, H),), (0, 1))),
            layer("bk", f"{attn}.k_proj.bias", (K * H,), (((K, H),), (0, 1))),
            layer("bv", f"{attn}.v_proj.bias", (K * H,), (((K, H),), (0, 1))),
        ]
    table += [
        # o_proj [D, N*H] -> [N, H, D]
        layer("wo", f"{attn}.o_proj.weight", (D, N * H), (((D,), (N, H)), (1, 2, 0))),
        layer("mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", (D,),
              same((D,))),
        layer("w_gate", f"{mlp}.gate_proj.weight", (F, D), transpose(F, D)),
        layer("w_up", f"{mlp}.up_proj.weight", (F, D), transpose(F, D)),
        layer("w_down", f"{mlp}.down_proj.weight", (D, F), transpose(D, F)),
        TensorMap(("final_norm",), "model.norm.weight", (D,), *same((D,))),
    ]
    if not cfg.tie_word_embeddings:
        table.append(TensorMap(("lm_head",), "lm_head.weight", (V, D), *transpose(V, D)))
    return table


def param_shapes(cfg: ModelConfig) -> dict[ParamPath, tuple[int, ...]]:
    """Every parameter path and its full (stacked) shape."""
    return {m.path: m.param_shape for m in tensor_map(cfg)}


def piece_bytes(total_bytes: int) -> int:
    """Bytes loading and conversion read per piece of a tensor of `total_bytes`: an eighth
    (a piece and its transposed copy stay well under the tensor), between 1 MiB and 64 MiB."""
    return min(64 << 20, max(1 << 20, total_bytes // 8))


def check_table(reader: WeightReader, table: list[TensorMap],
                dtypes: Mapping[str, np.dtype] = NUMPY_DTYPES) -> set[str]:
    """Fail before reading any data if a tensor of `table` is missing, mis-shaped or of a
    dtype outside `dtypes` (converted checkpoints also store int8 and fp8); returns the names
    used."""
    available = reader.names()
    used: set[str] = set()
    for m in table:
        for name in m.hf_names():
            if name not in available:
                raise CheckpointError(f"tensor {name!r} is missing from the checkpoint "
                                      f"(needed for {'/'.join(m.path)})")
            info = reader.info(name)
            if info.shape != m.hf_shape:
                raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)}, expected "
                                      f"{list(m.hf_shape)} ({info.file.name})")
            if info.dtype not in dtypes:
                raise unsupported_dtype(name, info)
            used.add(name)
    return used


def check_tensors(reader: WeightReader, cfg: ModelConfig) -> None:
    """`check_table` on a Hugging Face checkpoint; unused tensors are logged."""
    used = check_table(reader, tensor_map(cfg))
    _log_unused(sorted(reader.names() - used), cfg)


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


def build_param(reader: WeightReader, m: TensorMap, dtype: np.dtype,
                on_tensor: Callable[[str], None] | None = None) -> np.ndarray:
    """One whole parameter as a host array in `dtype`, layers stacked on axis 0 (tests and
    tools; loading and conversion read per layer or per shard instead)."""
    out = np.empty(m.param_shape, dtype=dtype)
    whole = tuple(slice(None) for _ in m.shape)
    for i, name in enumerate(m.hf_names()):
        # Cast while copying into the stacked buffer: one full-size copy, not two.
        out[i if m.num_layers is not None else ...] = read_region(reader, name, m, whole)
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
