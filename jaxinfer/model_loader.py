"""Turn a `--model` argument (a preset name, `dummy`, a Hugging Face or converted directory)
into a config, an NNX graph, parameters placed on the mesh, and a tokenizer.

Random presets are initialised directly into their shardings by a jitted initialiser, so even
a model larger than one device is never whole on one device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import checkpoints
from jaxinfer.config import PRESETS, ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.models import llama
from jaxinfer.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from sharding.rules import tree_shardings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig
    graphdef: object  # nnx.GraphDef of the model
    params: dict  # pure dict of jax.Array, placed with `shardings`
    tokenizer: Tokenizer | None  # None: the directory has no tokenizer files (ids only)
    source: str  # preset name or directory


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype) -> tuple[object, dict]:
    """(graphdef, pure-dict tree of NamedShardings) for the model's parameters."""
    abstract = llama.abstract_model(cfg, dtype=dtype)
    graphdef, _ = nnx.split(abstract)
    return graphdef, tree_shardings(mesh, llama.param_axes(abstract))


def random_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype, seed: int = 0):
    graphdef, shardings = param_shardings(cfg, mesh, dtype)

    def init():
        return _pure(nnx.split(llama.create(cfg, dtype=dtype, seed=seed))[1])

    return graphdef, jax.jit(init, out_shardings=shardings)()


def _pure(state) -> dict:
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def load_model(model: str, *, mesh: jax.sharding.Mesh, dtype: str = "bfloat16", seed: int = 0,
               allow_pickle: bool = False) -> LoadedModel:
    """Load `model`: a preset name from `PRESETS` or a model directory."""
    jdtype = jnp.dtype(dtype)
    if model in PRESETS:
        cfg = PRESETS[model]
        graphdef, params = random_params(cfg, mesh, jdtype, seed)
        return LoadedModel(cfg, graphdef, params, ByteTokenizer(vocab_size=cfg.vocab_size), model)
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(
            f"--model {model!r} is neither a directory nor a preset "
            f"(presets: {', '.join(sorted(PRESETS))})")
    cfg = checkpoints.load_model_config(path)
    graphdef, shardings = param_shardings(cfg, mesh, jdtype)
    params = checkpoints.load_params(path, cfg, dtype=jdtype, shardings=shardings,
                                     allow_pickle=allow_pickle)
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    if not has_tokenizer:
        logger.warning("%s has no tokenizer files: token ids only, no text", path)
    tokenizer = load_tokenizer(path) if has_tokenizer else None
    return LoadedModel(cfg, graphdef, params, tokenizer, os.fspath(path))
