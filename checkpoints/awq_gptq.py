"""AWQ and GPTQ int4 safetensors checkpoints -> jaxinfer's int4 QuantArrays (`jaxinfer/quant.py`).

A Hugging Face directory whose config.json has a `quantization_config` with `quant_method`
"awq" (AutoAWQ's GEMM layout) or "gptq" (AutoGPTQ / GPTQModel, `checkpoint_format` "gptq" or
"gptq_v2"), 4 bits and `group_size` 128, loads as `int4-g128`: the same representation as
quantizing a float model with `--quant int4-g128`, so the same kernel and reference run it.
Embeddings, norms, biases and lm_head are float tensors in these files and load as usual.

Packing conventions (read from AutoAWQ's `awq/modules/linear/gemm.py::WQLinear_GEMM.from_linear`
and AutoGPTQ's `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py::QuantLinear.pack`):

- AWQ: `qweight` int32 [K, N/8] packs 8 output columns per word: bits 4i..4i+3 of word c hold
  column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]; `qzeros` int32 [G, N/8] the same way; `scales`
  fp16 [G, N]. value = (q - zero) * scale.
- GPTQ: `qweight` int32 [K/8, N] packs 8 input rows per word: bits 4j..4j+3 of word i hold row
  8i + j; `qzeros` int32 [G, N/8] packs 8 columns per word in order; `scales` fp16 [G, N];
  `g_idx` int32 [K], the group of each row. Format "gptq" (v1) stores zero - 1, so the zero is
  the stored nibble + 1 (1..16); "gptq_v2" stores the zero itself. value = (q - zero) * scale.

Act-order (GPTQ `desc_act`): the rows of a group are scattered over K (`g_idx` is a
permutation of the contiguous assignment). Two things keep the layout exact and tensor-parallel
without an all-gather, after the TP-aware dequantization paper (Hoque et al., 2024):

- The MLP: `down_proj` is row parallel, so its input (the activation, split over `ffn` on tp)
  would have to be permuted across shards to match rows sorted by group. Instead its rows are
  sorted by `g_idx` (stable) at load time, and `gate_proj`'s and `up_proj`'s output columns
  (with their scales and zero points) are permuted the same way, so the activation comes out
  of the column-parallel layers already in that order, each tp shard holding its contiguous
  block. down_proj then has contiguous groups (a plain int4-g128 weight: the Pallas kernel
  runs it), and nothing moves between devices. This needs every group to have exactly
  `group_size` rows (what AutoGPTQ's act-order produces); anything else is refused.
- The other projections keep their rows in place with the per-row `g_idx` (`QuantArray.g_idx`,
  run by the reference's gather, not the kernel): q/k/v and gate/up read the replicated hidden
  state, and o_proj's rows stay with their tp shard, its scales and zero points replicated over
  tp (groups are scattered, so they cannot be split), so each shard dequantizes its own rows
  locally.

Host memory: one stacked parameter part at a time ([layers, ...] of the packed weight) is built
on the host and placed with its sharding; these checkpoints are a quarter the size of bf16.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np

from checkpoints.llama import param_shapes
from checkpoints.safetensors_io import WeightReader
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError
from jaxinfer.models.llama import quantized_weights
from pallas_kernels.int4_matmul import num_groups, pack_int4

logger = logging.getLogger(__name__)

ParamPath = tuple[str, ...]
GROUP = 128  # int4-g128, the one int4 mode
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ word bit slot i holds column 8c + AWQ_ORDER[i]
# Our projection -> the Hugging Face module it is quantized in.
MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
           "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
           "w_down": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class Int4Format:
    """What a checkpoint's `quantization_config` says."""

    method: str  # "awq" | "gptq"
    act_order: bool = False  # GPTQ desc_act: per-row groups (g_idx)
    zero_offset: int = 0  # added to a stored zero nibble (GPTQ v1: 1)

    @property
    def g_idx_paths(self) -> frozenset[ParamPath]:
        """Weights that keep a per-row g_idx (module docstring): all but the folded down."""
        if not self.act_order:
            return frozenset()
        return frozenset(("layers", n) for n in MODULES if n != "w_down")


def read_format(model_dir: str | Path) -> Int4Format | None:
    """The int4 format of a Hugging Face directory, None for a float one; a CheckpointError
    for a quantization this loader does not handle."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        qcfg = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # the config mapping reports an unreadable config.json
    if qcfg is None:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    where = f"{path}: quantization_config"
    if method not in ("awq", "gptq"):
        raise CheckpointError(f"{where}: quant_method {method!r} is not supported (awq, gptq)")
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    group = qcfg.get("group_size", qcfg.get("q_group_size"))
    if bits != 4 or group != GROUP:
        raise CheckpointError(f"{where}: bits {bits}, group_size {group}; only 4-bit with "
                              f"groups of {GROUP} loads (int4-g{GROUP})")
    if method == "awq":
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm" or qcfg.get("zero_point", True) is not True:
            raise CheckpointError(f"{where}: AWQ version {version!r} zero_point "
                                  f"{qcfg.get('zero_point')}; only the GEMM layout with zero "
                                  "points loads")
        return Int4Format("awq")
    fmt = str(qcfg.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported "
                              "(gptq, gptq_v2)")
    return Int4Format("gptq", act_order=bool(qcfg.get("desc_act", False)),
                      zero_offset=1 if fmt == "gptq" else 0)


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 words [...] -> their eight 4-bit fields [..., 8], lowest bits first."""
    w = words.astype(np.int32).view(np.uint32)[..., None]
    return ((w >> (4 * np.arange(8, dtype=np.uint32))) & 15).astype(np.uint8)


def unpack_columns(words: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """[R, N/8] int32 packed along columns (slot i holds column 8c + order[i]) -> [R, N]."""
    nib = _nibbles(words)  # [R, N/8, 8]: nib[r, c, i] is column 8c + order[i]
    out = np.empty_like(nib)
    out[..., list(order)] = nib
    return out.reshape(words.shape[0], -1)


def unpack_rows(words: np.ndarray) -> np.ndarray:
    """GPTQ's [K/8, N] int32 packed along rows (slot j of word i holds row 8i + j) -> [K, N]."""
    return np.moveaxis(_nibbles(words), -1, 1).reshape(-1, words.shape[1])


@dataclasses.dataclass
class _Layer:
    """One projection of one layer in HF orientation: codes [K, N] (in x out)."""

    codes: np.ndarray  # uint8 0..15
    scale: np.ndarray  # float32 [G, N]
    zero: np.ndarray  # int8 [G, N]
    g_idx: np.ndarray | None  # int32 [K]


def _read(reader: WeightReader, fmt: Int4Format, prefix: str, k: int, n: int) -> _Layer:
    def get(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
        name = f"{prefix}.{suffix}"
        if name not in reader.names():
            raise CheckpointError(f"tensor {name!r} is missing from the {fmt.method} checkpoint")
        x = reader.read(name)
        if tuple(x.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(x.shape)}, expected "
                                  f"{list(shape)}")
        return x

    g = num_groups(k, GROUP)
    if n % 8 or (fmt.method == "gptq" and k % 8):
        raise CheckpointError(f"{prefix}: {k} x {n} cannot hold int4 packed in 32-bit words")
    if fmt.method == "awq":
        codes = unpack_columns(get("qweight", (k, n // 8)), AWQ_ORDER)
        zero = unpack_columns(get("qzeros", (g, n // 8)), AWQ_ORDER)
        g_idx = None
    else:
        codes = unpack_rows(get("qweight", (k // 8, n)))
        zero = unpack_columns(get("qzeros", (g, n // 8)))
        g_idx = None
        if f"{prefix}.g_idx" in reader.names():
            g_idx = get("g_idx", (k,)).astype(np.int32)
            if g_idx.min() < 0 or g_idx.max() >= g:
                raise CheckpointError(f"{prefix}.g_idx: groups outside 0..{g - 1}")
            if not fmt.act_order:  # then the groups must be the contiguous ones
                if not np.array_equal(g_idx, np.arange(k) // GROUP):
                    raise CheckpointError(f"{prefix}.g_idx: groups are not contiguous but "
                                          "quantization_config has no desc_act")
                g_idx = None
        elif fmt.act_order:
            raise CheckpointError(f"tensor {prefix + '.g_idx'!r} is missing from the act-order "
                                  "gptq checkpoint")
    scale = get("scales", (g, n)).astype(np.float32)
    return _Layer(codes, scale, (zero.astype(np.int16) + fmt.zero_offset).astype(np.int8), g_idx)


def _down_order(layer: _Layer, prefix: str) -> np.ndarray:
    """The row order that makes an act-order down_proj's groups contiguous (module doc)."""
    perm = np.argsort(layer.g_idx, kind="stable")
    k = len(perm)
    if not np.array_equal(layer.g_idx[perm], np.arange(k) // GROUP):
        raise CheckpointError(f"{prefix}.g_idx: act-order groups must each hold {GROUP} rows "
                              "to be made contiguous")
    return perm


def _to_ours(layer: _Layer, shape: tuple[int, ...], c: int) -> dict[str, np.ndarray]:
    """One layer's parts in our layout for a weight of per-layer float shape [*C, *O]."""
    cshape, oshape = shape[:c], shape[c:]
    q = pack_int4(layer.codes.T, GROUP)  # [N, K/2] uint8 (jax, on the host CPU device)
    parts = {"q": np.asarray(q).reshape(*oshape, *cshape[:-1], cshape[-1] // 2),
             "scale": layer.scale.reshape(-1, *oshape),
             "zero": layer.zero.reshape(-1, *oshape)}
    if layer.g_idx is not None:
        parts["g_idx"] = layer.g_idx
    return parts


def load_int4(reader: WeightReader, cfg: ModelConfig, fmt: Int4Format, shardings: dict
              ) -> dict[ParamPath, jax.Array]:
    """Every quantized projection's stored parts, placed: {path + (part,): array}.

    `shardings` is the split form (`jaxinfer.quant.split_quant`) of the model's quantized
    shardings, with g_idx entries for `fmt.g_idx_paths`."""
    shapes = param_shapes(cfg)
    layout = quantized_weights(cfg, "int4")
    L = cfg.num_layers
    down_perms: list[np.ndarray | None] = [None] * L
    if fmt.act_order:  # the down_proj row orders first: gate and up follow them
        k, n = cfg.intermediate_size, cfg.hidden_size
        for i in range(L):
            prefix = f"model.layers.{i}.{MODULES['w_down']}"
            down_perms[i] = _down_order(_read(reader, fmt, prefix, k, n), prefix)
    out: dict[ParamPath, jax.Array] = {}
    cpu = jax.devices("cpu")[0]
    for path, (b, c) in layout.items():
        if path[0] != "layers" or b != 1:
            raise CheckpointError(f"{'/'.join(path)}: no {fmt.method} tensor for it")
        name = path[1]
        full = shapes[path]  # [L, *C, *O]
        k = int(np.prod(full[1:1 + c]))
        n = int(np.prod(full[1 + c:]))
        stacked: dict[str, list[np.ndarray]] = {}
        for i in range(L):
            prefix = f"model.layers.{i}.{MODULES[name]}"
            layer = _read(reader, fmt, prefix, k, n)
            perm = down_perms[i]
            if perm is not None and name == "w_down":
                layer = _Layer(layer.codes[perm], layer.scale, layer.zero, None)
            elif perm is not None and name in ("w_gate", "w_up"):
                layer = _Layer(layer.codes[:, perm], layer.scale[:, perm], layer.zero[:, perm],
                               layer.g_idx)
            with jax.default_device(cpu):
                parts = _to_ours(layer, full[1:], c)
            for part, x in parts.items():
                stacked.setdefault(part, []).append(x)
        for part, xs in stacked.items():
            host = np.stack(xs)
            del xs
            target = shardings
            for key in (*path, part):
                target = target[key]
            out[(*path, part)] = jax.make_array_from_callback(
                host.shape, target, lambda index, host=host: host[index])
    logger.info("loaded %s int4 projections (%s)", fmt.method,
                "act-order" if fmt.act_order else "contiguous groups")
    return out
