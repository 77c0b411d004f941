"""`checkpoints.convert --quant`: quantized orbax checkpoints, end to end.

A converted quantized directory must load as the same QuantArrays (bit for bit) as quantizing
the Hugging Face weights at load time, generate through `jaxinfer.generate` with either
kernel choice and the same greedy tokens, refuse to be re-quantized differently, and a group
size that does not divide a weight's contraction dim must fail before anything is written.
"""

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
from checkpoints.convert import convert
from jaxinfer import generate
from jaxinfer.errors import ConfigError
from jaxinfer.model_loader import load_model
from jaxinfer.quant import QuantArray
from sharding.mesh import make_mesh

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]


def _mesh():
    return make_mesh("dp=1", devices=jax.devices()[:1])


def _leaves_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("mode", ["int8", "int8-g64", "fp8", "int4-g128"])
def test_converted_checkpoint_loads_the_quantized_weights(hf_model, tmp_path, mode):
    hf = hf_model("llama")  # untied lm_head: int8 quantizes it, fp8 and int4 keep it float
    out = tmp_path / "q"
    summary = convert(hf.path, out, dtype="float32", quant=mode, show_progress=False)
    assert f"{mode} weights" in summary
    info = json.loads((out / "jaxinfer_checkpoint.json").read_text())
    assert info["quant"] == mode and info["dtype"] == "float32"
    assert "layers/wq/q" in info["params"] and "layers/wq/scale" in info["params"]
    assert checkpoints.checkpoint_quant(out) == mode

    stored = load_model(str(out), mesh=_mesh(), dtype="float32")
    at_load = load_model(str(hf.path), mesh=_mesh(), dtype="float32", quant=mode)
    assert stored.quant == at_load.quant == mode
    wq = stored.params["layers"]["wq"]
    assert isinstance(wq, QuantArray) and wq.kind == mode[:4].rstrip("-")
    assert isinstance(stored.params["lm_head"], QuantArray) == mode.startswith("int8")
    if mode == "int4-g128":  # zero points stored beside q and scale, packed q as uint8
        assert "layers/wq/zero" in info["params"]
        assert wq.q.dtype == np.uint8 and wq.zero is not None
    _leaves_equal(stored.params, at_load.params)
    # Asking for what is stored is fine; anything else is a clear error.
    load_model(str(out), mesh=_mesh(), dtype="float32", quant=mode)
    for other in ("none", "int8-g128" if mode != "int8-g128" else "int8"):
        with pytest.raises(ConfigError, match="quantized weights"):
            load_model(str(out), mesh=_mesh(), dtype="float32", quant=other)


def test_generate_on_a_quantized_checkpoint(hf_model, tmp_path, capsys):
    out = tmp_path / "int8"
    convert(hf_model("llama_tied").path, out, dtype="float32", quant="int8", show_progress=False)
    args = ["--model", str(out), "--prompt-ids", "3,14,15,92,65", "--max-new-tokens", "10",
            "--json", "--dtype", "float32"]
    results = {}
    for kernels in ("reference", "pallas"):
        assert generate.main(args + ["--kernels", kernels]) == 0
        results[kernels] = json.loads(capsys.readouterr().out)
    assert len(results["reference"]["token_ids"]) == 10
    assert results["reference"]["token_ids"] == results["pallas"]["token_ids"]
    # The float model quantized at load generates the same tokens as the converted one.
    assert generate.main(["--model", str(hf_model("llama_tied").path), "--quant", "int8",
                          *args[2:]]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == results["reference"]["token_ids"]


def test_cli_quant_end_to_end_and_errors(hf_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "checkpoints.convert", *map(str, args)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    hf = hf_model("llama").path
    ok = cli("--hf-dir", hf, "--out", tmp_path / "fp8", "--quant", "fp8")
    assert ok.returncode == 0, ok.stderr
    assert "fp8 weights" in ok.stdout
    # hidden size 64 is not a multiple of 128: refused before anything is written.
    bad = cli("--hf-dir", hf, "--out", tmp_path / "g128", "--quant", "int8-g128")
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "checkpoints.convert: error: quantization group 128 must divide the contraction "
        "size 64"]
    assert not (tmp_path / "g128").exists()
    usage = cli("--hf-dir", hf, "--out", tmp_path / "x", "--quant", "int4")
    assert usage.returncode == 2 and "--quant" in usage.stderr
