"""Trained TinyStories checkpoints from ../shared/models: coherent greedy continuations equal to
Hugging Face transformers on the same files (skipped when the folder is absent)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.engine.llm import LLM
from jaxinfer.model_loader import load_model
from sharding.mesh import make_mesh

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
NAMES = ["stories260K-hf", "llama2xs-281K-hf", "babyllama-tok105-940K-hf"]
NEW = 48


def _dir(name: str) -> Path:
    path = MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} not present")
    return path


def _llm(path: Path) -> LLM:
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    loaded = load_model(str(path), mesh=mesh, dtype="float32")
    engine = EngineConfig(page_size=16, num_pages=64, max_seq_len=256, dtype="float32",
                          prefill_buckets=(16,), prefill_rows=(1,), batch_buckets=(1,),
                          decode_steps=8)
    return LLM.from_loaded(loaded, engine, mesh=mesh)


def _generate(llm: LLM, prompt: list[int], max_tokens: int):
    [[out]] = llm.generate([llm.request(prompt, max_tokens=max_tokens)])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _dir(name)
    llm = _llm(path)
    prompt = llm.tokenizer.encode("Once upon a time")
    ours = _generate(llm, prompt, NEW)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=list(llm.core.model_cfg.eos_token_ids) or None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.token_ids == ref


def test_stories260k_tells_the_known_story():
    llm = _llm(_dir("stories260K-hf"))
    prompt = llm.tokenizer.encode("Once upon a time")
    assert prompt == [1, 403, 407, 261, 378]
    out = _generate(llm, prompt, 40)
    text = "Once upon a time" + out.text
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to "
                           "play outside in the park."), text
    assert np.all(np.asarray(out.token_ids) < 512)
