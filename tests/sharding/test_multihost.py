"""Multi-host on one machine: two `jaxinfer.generate` processes with 2 CPU devices each join
through `jax.distributed` (gloo collectives) and run one pp=2 x tp=2 mesh, the pipeline stages
on different processes. Process 0 must print the tokens one process computes on one device.

The model is a converted (orbax) checkpoint, so each process restores only the layers of its
own stage; the test also checks the flag/environment plumbing of `sharding.multihost`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from checkpoints import convert  # noqa: E402
from jaxinfer.errors import ConfigError  # noqa: E402
from sharding import multihost  # noqa: E402
from tests.jaxinfer.test_hf_parity import PROMPTS  # noqa: E402
from tests.sharding.test_parallel_generate import greedy, make_generator, save_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_from_flags_and_env(monkeypatch):
    for name in (multihost.ENV_COORDINATOR, multihost.ENV_NUM_PROCESSES,
                 multihost.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert not multihost.config_from().is_distributed
    assert not multihost.initialize(multihost.config_from())  # single process: no-op
    monkeypatch.setenv(multihost.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(multihost.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(multihost.ENV_PROCESS_ID, "3")
    cfg = multihost.config_from()
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 3)
    flags = multihost.config_from("h:1", 2, 1)  # flags win over the environment
    assert (flags.coordinator, flags.num_processes, flags.process_id) == ("h:1", 2, 1)
    monkeypatch.setenv(multihost.ENV_NUM_PROCESSES, "four")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES must be an integer"):
        multihost.config_from()


def test_two_processes_generate_like_one(tmp_path):
    hf = tmp_path / "hf"
    save_hf_model("llama", hf)
    conv = tmp_path / "converted"
    assert convert.main(["--hf-dir", str(hf), "--out", str(conv), "--dtype", "float32"]) == 0
    want = greedy(make_generator(conv, "dp=1", devices=jax.devices()[:1]))

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    argv = [sys.executable, "-m", "jaxinfer.generate", "--model", str(conv), "--json",
            "--max-new-tokens", str(NEW_TOKENS), "--mesh", "pp=2,tp=2", "--page-size", "4",
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    procs = [subprocess.Popen(argv + ["--process-id", str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
    # gloo itself prints "[Gloo] Rank r is connected to ..." on stdout; keep the JSON lines.
    results = [json.loads(line) for line in outs[0][0].splitlines() if line.startswith("{")]
    assert [r["token_ids"] for r in results] == want
    assert [r["prompt_ids"] for r in results] == PROMPTS
    assert not [line for line in outs[1][0].splitlines() if line.startswith("{")]  # only 0 prints
