"""Turn a `--model` argument (a random preset such as `dummy`, a bundled model such as `demo`, a
Hugging Face or converted directory)
into a config, an NNX graph, parameters placed on the mesh, and a tokenizer.

Random presets are initialised directly into their shardings by a jitted initialiser, so even
a model larger than one device is never whole on one device.

Quantization (`quant="int8" | "int8-g64" | "int8-g128" | "fp8"`, see `jaxinfer/quant.py`): a
random preset is quantized inside its initialiser; a float checkpoint is loaded and then
quantized one weight at a time (each float weight freed as its QuantArray lands in place); a
checkpoint converted with `--quant` loads its QuantArrays directly, and asking for a different
quantization than it holds is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

import checkpoints
from jaxinfer.config import ModelConfig, model_source
from jaxinfer.errors import ConfigError
from jaxinfer.models import llama
from jaxinfer.quant import (QuantSpec, parse_quant, quantize, quantize_axes_tree, quantize_params,
                            replace_paths)
from jaxinfer.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from sharding.mesh import MeshSpec, check_model_fits
from sharding.rules import model_rules, tree_shardings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig
    graphdef: object  # nnx.GraphDef of the model
    params: dict  # pure dict of jax.Array, placed with `shardings`
    tokenizer: Tokenizer | None  # None: the directory has no tokenizer files (ids only)
    source: str  # the --model value: preset, bundled model or directory
    quant: str = "none"  # weight quantization of `params` (jaxinfer.quant.QUANT_MODES)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype,
                    spec: QuantSpec | None = None,
                    g_idx_paths: frozenset = frozenset()) -> tuple[object, dict]:
    """(graphdef, pure-dict tree of NamedShardings) for the model's parameters; with `spec`,
    quantized weights are QuantArrays of shardings (with a g_idx sharding for the weights in
    `g_idx_paths`: GPTQ act-order, `checkpoints/awq_gptq.py`)."""
    check_model_fits(MeshSpec.of(mesh), cfg)  # one-line error before any weight is read
    abstract = llama.abstract_model(cfg, dtype=dtype)
    graphdef, _ = nnx.split(abstract)
    axes = llama.param_axes(abstract)
    rules = model_rules(cfg, mesh)
    if spec is not None:
        layout = llama.quantized_weights(cfg, spec.kind)
        _check_groups_split(nnx.split(abstract)[1], axes, layout, spec, rules, mesh)
        axes = quantize_axes_tree(axes, layout, spec, g_idx_paths)
    return graphdef, tree_shardings(mesh, axes, rules)


def _check_groups_split(state, axes: dict, layout: dict, spec: QuantSpec, rules,
                        mesh: jax.sharding.Mesh) -> None:
    """A weight whose contraction dim is split over a mesh axis must be split at group
    boundaries: its group count must divide evenly, and int4's short last group (K not a
    multiple of the group) cannot be split at all (its scale row would land on one shard while
    its rows sit on another). The sharding rules see only the scale's group count."""
    if spec.group is None:
        return
    params = _pure(state)
    for path, (b, c) in layout.items():
        w, names = params, axes
        for key in path:
            w, names = w[key], names[key]
        axis = rules.get(names[b])
        size = dict(mesh.shape).get(axis, 1) if axis else 1
        k = math.prod(w.shape[b:b + c])
        if size > 1 and (k % spec.group or (k // spec.group) % size):
            raise ConfigError(f"{'/'.join(path)}: contraction size {k} in groups of "
                              f"{spec.group} cannot be split over {axis}={size} at group "
                              f"boundaries ({spec.name})")


def random_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype, seed: int = 0,
                  spec: QuantSpec | None = None):
    graphdef, shardings = param_shardings(cfg, mesh, dtype, spec)

    def init():
        params = _pure(nnx.split(llama.create(cfg, dtype=dtype, seed=seed))[1])
        if spec is None:
            return params
        return quantize_params(params, llama.quantized_weights(cfg, spec.kind), spec)

    return graphdef, jax.jit(init, out_shardings=shardings)()


def quantize_loaded(params: dict, cfg: ModelConfig, spec: QuantSpec,
                    shardings: dict) -> dict:
    """Quantize float params in place of their weights, one weight at a time, each placed by
    its entry in `shardings` (from `param_shardings(..., spec)`)."""
    layout = llama.quantized_weights(cfg, spec.kind)
    updates = {}
    for path, (b, c) in layout.items():
        w, target = params, shardings
        for key in path:
            w, target = w[key], target[key]
        fn = jax.jit(lambda a, b=b, c=c: quantize(a, spec, batch=b, contract=c),
                     out_shardings=target)
        updates[path] = fn(w)
        w.delete()  # free the float weight before quantizing the next
    return replace_paths(params, updates)


def _pure(state) -> dict:
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def load_model_config(model: str) -> ModelConfig:
    """The config of `model` (a preset, bundled model or directory) without loading weights."""
    source = model_source(model)
    return source if isinstance(source, ModelConfig) else checkpoints.load_model_config(source)


def load_model(model: str, *, mesh: jax.sharding.Mesh, dtype: str = "bfloat16", seed: int = 0,
               allow_pickle: bool = False, quant: str | None = None) -> LoadedModel:
    """Load `model`: a preset name from `PRESETS` or a model directory.

    `quant`: None loads what is stored (a float checkpoint stays float); a mode from
    `jaxinfer.quant.QUANT_MODES` quantizes a float model at load ("none" keeps it float)."""
    jdtype = jnp.dtype(dtype)
    spec = parse_quant(quant)
    source = model_source(model)
    if isinstance(source, ModelConfig):
        cfg = source
        graphdef, params = random_params(cfg, mesh, jdtype, seed, spec)
        return LoadedModel(cfg, graphdef, params, ByteTokenizer(vocab_size=cfg.vocab_size), model,
                           spec.name if spec else "none")
    path = source
    cfg = checkpoints.load_model_config(path)
    stored = parse_quant(checkpoints.checkpoint_quant(path))
    if stored is not None and quant is not None and spec != stored:
        raise ConfigError(f"{path} holds {stored.name}-quantized weights; it cannot be loaded "
                          f"as --quant {quant} (convert the float model again instead)")
    graphdef, shardings = param_shardings(cfg, mesh, jdtype, stored,
                                          checkpoints.checkpoint_g_idx_paths(path))
    params = checkpoints.load_params(path, cfg, dtype=jdtype, shardings=shardings,
                                     allow_pickle=allow_pickle)
    if stored is None and spec is not None:
        _, qshardings = param_shardings(cfg, mesh, jdtype, spec)
        params = quantize_loaded(params, cfg, spec, qshardings)
    spec = stored or spec
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    if not has_tokenizer:
        logger.warning("%s has no tokenizer files: token ids only, no text", path)
    tokenizer = load_tokenizer(path) if has_tokenizer else None
    return LoadedModel(cfg, graphdef, params, tokenizer, model,
                       spec.name if spec else "none")

