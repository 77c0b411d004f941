"""The bundled `demo` model (jaxinfer/models/demo, trained by benchmarks/train_models.py): the
default of `python -m serve` and `generate`; loaded as a Hugging Face directory and after
conversion to orbax, its greedy output through the engine equals transformers' on the same
files, and its tokenizer round-trips stdlib text as transformers' does."""

import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxinfer.config import BUNDLED_MODELS, DEFAULT_MODEL, EngineConfig
from jaxinfer.engine.llm import LLM
from jaxinfer.model_loader import load_model
from jaxinfer.tokenizer import tokenizer_for_model
from sharding.mesh import make_mesh

DEMO = BUNDLED_MODELS["demo"]
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):\n"]
NEW = 40


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("dp=1", devices=jax.devices()[:1])


def _llm(model: str, mesh) -> LLM:
    loaded = load_model(model, mesh=mesh, dtype="float32")
    engine = EngineConfig(page_size=16, num_pages=32, max_seq_len=128, dtype="float32",
                          prefill_buckets=(32,), prefill_rows=(2,), batch_buckets=(2,),
                          decode_steps=8)
    return LLM.from_loaded(loaded, engine, mesh=mesh)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([llm.request(p, max_tokens=NEW) for p in prompts])
    return [out.token_ids for [out] in outs]


def test_demo_is_the_default_and_ships_its_files():
    from serve.__main__ import build_parser

    assert DEFAULT_MODEL == "demo" and build_parser().parse_args([]).model == "demo"
    names = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert (DEMO / "model.safetensors").stat().st_size <= 8 * 1024 * 1024
    assert tokenizer_for_model("demo").eos_ids == (1,)  # the front loads it without JAX


def test_demo_greedy_matches_transformers_and_writes_code(mesh):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llm = _llm("demo", mesh)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    ours = _greedy(llm, prompts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    for prompt, mine in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=1, pad_token_id=1)[0, len(prompt):].tolist()
        assert mine == ref
    text = llm.tokenizer.decode(ours[0])
    assert text.startswith("\n    ") and "return" in text, text  # an indented function body


def test_demo_converted_to_orbax_loads_the_same_weights(mesh, tmp_path):
    from checkpoints.convert import convert

    convert(DEMO, tmp_path / "demo", dtype="bfloat16", show_progress=False)
    direct = load_model("demo", mesh=mesh, dtype="float32")
    converted = load_model(str(tmp_path / "demo"), mesh=mesh, dtype="float32")
    assert converted.cfg == direct.cfg
    for a, b in zip(jax.tree.leaves(converted.params), jax.tree.leaves(direct.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "def fibonacci(n):"
    assert converted.tokenizer.encode(text) == direct.tokenizer.encode(text)


def test_demo_tokenizer_round_trips_stdlib_text_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    ours = tokenizer_for_model("demo")
    hf = transformers.AutoTokenizer.from_pretrained(DEMO)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("heapq.py", "shlex.py")]
    texts.append('s = "naïve café — π ≈ 3.14159 🐍"\n\tif x:\r\n        pass  \n\n')
    for text in texts:
        ids = ours.encode(text)
        assert ids[0] == 0 and ids.count(0) == 1
        assert ids == hf(text).input_ids
        assert ours.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode("x\n")[-1] == ours.encode("\n")[-1]  # a newline ends on its own token
