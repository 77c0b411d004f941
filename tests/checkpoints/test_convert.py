"""`python -m checkpoints.convert` end to end, as a user runs it (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import checkpoints
from checkpoints.convert import COPIED_FILES, main

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
ERROR = "checkpoints.convert: error: "


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "checkpoints.convert", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def assert_one_error_line(proc, code: int, *fragments: str) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(ERROR), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


def _params(path, dtype="float32"):
    cfg = checkpoints.load_model_config(path)
    from jaxinfer.models import llama as model_llama
    from sharding import make_mesh, tree_shardings

    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    shardings = tree_shardings(mesh, model_llama.param_axes(model_llama.abstract_model(cfg)))
    return checkpoints.load_params(path, cfg, dtype=dtype, shardings=shardings)


def test_convert_end_to_end(hf_copy, tmp_path):
    hf = hf_copy("llama_sharded")
    (hf / "tokenizer_config.json").write_text("{}")  # a tokenizer file to copy
    out = tmp_path / "out"
    proc = run_cli("--hf-dir", hf, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    [summary] = proc.stdout.splitlines()
    assert summary.startswith(f"converted {hf} -> {out}: llama") and "bfloat16" in summary
    assert "converting" in proc.stderr  # the tqdm bar
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes()
    assert not any((out / name).exists() for name in COPIED_FILES
                   if not (hf / name).exists())
    info = json.loads((out / "jaxinfer_checkpoint.json").read_text())
    assert (info["dtype"], info["quant"], info["format_version"], info["params_format"]) == (
        "bfloat16", "none", 2, "safetensors")
    assert checkpoints.load_model_config(out) == checkpoints.load_model_config(hf)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 _params(out, "bfloat16"), _params(hf, "bfloat16"))

    # A second run into the same, now non-empty, directory is refused; --overwrite replaces it.
    assert_one_error_line(run_cli("--hf-dir", hf, "--out", out), 1, "not empty", "--overwrite")
    proc = run_cli("--hf-dir", hf, "--out", out, "--dtype", "float32", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "jaxinfer_checkpoint.json").read_text())["dtype"] == "float32"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 _params(out), _params(hf))


@pytest.mark.parametrize("args, fragment", [
    (["--hf-dir", "x"], "--out"),
    (["--hf-dir", "x", "--out", "y", "--dtype", "int4"], "--dtype"),
    (["--hf-dir", "x", "--out", "y", "--bogus"], "--bogus"),
])
def test_usage_errors_are_one_line(args, fragment):
    assert_one_error_line(run_cli(*args), 2, fragment)


def test_errors_are_one_line(hf_model, hf_copy, tmp_path):
    assert_one_error_line(run_cli("--hf-dir", tmp_path / "absent", "--out", tmp_path / "o"), 1,
                          "no such directory")

    bad = hf_copy("llama_tied")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert_one_error_line(run_cli("--hf-dir", bad, "--out", tmp_path / "o"), 1,
                          "model_type 'gpt2' is not supported")

    truncated = hf_copy("llama")
    file = truncated / "model.safetensors"
    os.truncate(file, file.stat().st_size - 10)
    assert_one_error_line(run_cli("--hf-dir", truncated, "--out", tmp_path / "o"), 1,
                          "model.safetensors", "truncated")
    assert not (tmp_path / "o").exists()  # nothing is written before validation passes


def test_pickle_refused_then_allowed(hf_model, tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    src = hf_model("qwen2").path
    hf = tmp_path / "pickled"
    hf.mkdir()
    torch.save(st_torch.load_file(src / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "config.json").write_bytes((src / "config.json").read_bytes())
    line = assert_one_error_line(run_cli("--hf-dir", hf, "--out", tmp_path / "o"), 1)
    assert line == (f"{ERROR}{hf}: pickle weights (pytorch_model.bin) can run arbitrary code; "
                    "pass --allow-pickle to load them")
    # In-process this time (the lead's tests call main() directly too).
    assert main(["--hf-dir", str(hf), "--out", str(tmp_path / "o"), "--allow-pickle",
                 "--dtype", "float32"]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 _params(tmp_path / "o"), _params(src))
