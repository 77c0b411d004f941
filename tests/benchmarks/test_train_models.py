"""benchmarks/train_models.py on CPU: a tiny model trained for a few steps on a slice of the
standard library; its loss falls, and the Hugging Face directory it writes gives the same
tokens, logits and greedy continuations in transformers (PyTorch CPU) as in our loader with
our training forward. float32 (one bfloat16 check); logits within 1e-4 (O(1-10) here)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.model_loader import load_model
from jaxinfer.models import train_forward
from jaxinfer.tokenizer import load_tokenizer
from sharding.mesh import make_mesh

# The training script (benchmarks/, not the runtime); the bundled demo's parity with
# transformers stays in the gate (tests/jaxinfer/test_demo_model.py).
pytestmark = pytest.mark.slow
pytest.importorskip("optax")  # the training script's optimizer
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_models.py"
SLICE = ["--max-bytes", "150000"]
LOGIT_ATOL = 1e-4
PROMPT = "def fibonacci(n):\n"


@functools.cache
def _script():
    """The script as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("train_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(work dir, JSON records) of one CLI run: tiny preset, 40 steps, seq 64."""
    work = tmp_path_factory.mktemp("train_models")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--out", str(work / "model"),
           "--tokenizer", str(work / "tok"), "--steps", "40", "--seq-len", "64",
           "--eval-every", "10", "--eval-tokens", "4096", "--sample-tokens", "8", *SLICE]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return work, records


def _loaded(model_dir: Path):
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    return load_model(str(model_dir), mesh=mesh, dtype="float32")


def test_loss_falls_and_logs_json_lines(trained):
    work, records = trained
    [config] = [r for r in records if r["event"] == "config"]
    steps = [r for r in records if r["event"] == "train"]
    [final] = [r for r in records if r["event"] == "final"]
    assert config["seq_len"] == 64 and config["val_files"] >= 1
    assert [r["step"] for r in steps] == [0, 10, 20, 30, 40]
    assert all(r["tokens_per_s"] > 0 for r in steps[1:])
    assert steps[-1]["train_loss"] < steps[1]["train_loss"] - 0.5
    assert final["val_loss"] < steps[0]["val_loss"] - 0.5  # from ~ln(512) = 6.2
    assert final["val_loss"] == min(r["val_loss"] for r in steps)
    assert len(final["samples"]) == 4 and all(s["tokens"] > 0 for s in final["samples"])
    names = {p.name for p in (work / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert final["weights_bytes"] == (work / "model" / "model.safetensors").stat().st_size


def test_transformers_and_our_loader_agree(trained):
    work, _ = trained
    model_dir = work / "model"
    loaded = _loaded(model_dir)
    cfg = loaded.cfg
    assert cfg.bos_token_id == 0 and cfg.eos_token_ids == (1,) and cfg.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:2000]
    ids = loaded.tokenizer.encode(text)[:cfg.max_position_embeddings]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(train_forward.forward(cfg, loaded.params, jnp.asarray([ids]))[0])
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=LOGIT_ATOL)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()

    prompt = loaded.tokenizer.encode(PROMPT)
    fwd = jax.jit(lambda t: train_forward.forward(cfg, loaded.params, t))
    mine = train_forward.greedy(fwd, prompt, max_new_tokens=24,
                                length=cfg.max_position_embeddings, stop_ids=cfg.eos_token_ids)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          pad_token_id=cfg.eos_token_ids[0])
    assert mine == out[0, len(prompt):].tolist()


def test_bfloat16_forward_tracks_float32(trained):
    """The GPU default: float32 weights cast to bfloat16 inside the forward."""
    work, _ = trained
    loaded = _loaded(work / "model")
    ids = jnp.asarray([loaded.tokenizer.encode(PROMPT * 3)])
    ref = train_forward.forward(loaded.cfg, loaded.params, ids)
    low = train_forward.forward(loaded.cfg, loaded.params, ids, dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))
    assert 0 < float(jnp.max(jnp.abs(low - ref)))  # it did compute in bfloat16


def test_tokenizer_round_trip_on_stdlib_text(trained):
    work, _ = trained
    ours = load_tokenizer(work / "model")
    hf = transformers.AutoTokenizer.from_pretrained(work / "model")
    assert ours.bos_id == hf.bos_token_id == 0 and ours.eos_ids == (hf.eos_token_id,) == (1,)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8")
             for name in ("string.py", "heapq.py", "json/decoder.py")]
    texts.append('s = "naïve café — π ≈ 3.14159 🐍"\n\tif x:\r\n        pass  \n')
    for text in texts:
        ids = ours.encode(text)
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
        assert ids == hf(text).input_ids
        assert ours.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == text


def test_untied_export_matches_transformers(trained, tmp_path):
    """The lm_head path of the export (the presets tie it): random weights, float32 file."""
    work, _ = trained
    tm = _script()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tok" / "tokenizer.json"))
    cfg = dataclasses.replace(tm.PRESETS["tiny"].model, vocab_size=tok.get_vocab_size(),
                              tie_word_embeddings=False, bos_token_id=0, eos_token_ids=(1,),
                              max_position_embeddings=64)
    params = tm.init_params(cfg, seed=3)
    params["lm_head"] = params["lm_head"] * 20.0  # logits O(1), so the test has teeth
    tm.save_hf_model(tmp_path, cfg, params, tok, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = list(range(2, 50))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(train_forward.forward(cfg, params, jnp.asarray([ids]))[0])
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=LOGIT_ATOL)
    # Random weights do not collapse into one repeated token: a greedy check with teeth.
    fwd = jax.jit(lambda t: train_forward.forward(cfg, params, t))
    mine = train_forward.greedy(fwd, ids[:8], max_new_tokens=24, length=64, stop_ids=(1,))
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids[:8]]), max_new_tokens=24, do_sample=False,
                          pad_token_id=1)
    assert mine == out[0, 8:].tolist() and len(set(mine)) > 4
    loaded = _loaded(tmp_path)
    assert loaded.cfg == cfg
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_measure_agreement_of_a_model_with_itself(trained, capsys):
    work, _ = trained
    tm = _script()
    model = str(work / "model")
    args = tm.build_parser().parse_args(
        ["--measure-agreement", model, model, "--eval-tokens", "1024", "--batch", "4", *SLICE])
    record = tm.measure_agreement(args)
    assert record["agreement"] == 1.0 and record["positions"] == 1024
    assert record["draft_val_loss"] == record["target_val_loss"] and record["cost_ratio"] == 1.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record
