"""Tiny random-weight Hugging Face checkpoints written by transformers, built once per session."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config class, model class, config overrides, save options)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE), {}),
    "llama_sharded": ("LlamaConfig", "LlamaForCausalLM",
                      dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE),
                      {"max_shard_size": "50KB"}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True), {}),
    "llama_bf16": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False),
                   {"bfloat16": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), {}),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(tie_word_embeddings=False, sliding_window=32, head_dim=16), {}),
}


@dataclasses.dataclass(frozen=True)
class HFModel:
    name: str
    path: Path
    state: dict[str, np.ndarray]  # the torch state dict as float32 numpy (what was saved)


def _build(name: str, root: Path) -> HFModel:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls, extra, save = CASES[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    # "llama_sharded" must hold the very weights of "llama": same seed, same config.
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for p_name, p in model.named_parameters():
            if p_name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.normal_(0, 0.5)  # HF inits these to 0/1; random values catch mix-ups
    if save.get("bfloat16"):
        model = model.to(torch.bfloat16)
    path = root / name
    kwargs = {"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    state = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    return HFModel(name, path, state)


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(name) -> HFModel; each case is built once per session (read-only for tests)."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, HFModel] = {}

    def get(name: str) -> HFModel:
        if name not in cache:
            cache[name] = _build(name, root)
        return cache[name]

    return get


@pytest.fixture
def hf_copy(hf_model, tmp_path):
    """hf_copy(name) -> a private, writable copy of a case's directory (for corrupting)."""

    def copy(name: str) -> Path:
        dst = tmp_path / f"{name}-copy"
        shutil.copytree(hf_model(name).path, dst)
        return dst

    return copy
