"""Multi-host serving on one machine: two `python -m serve` processes with one CPU device each
join through `jax.distributed` and serve a tp=2 mesh that spans both. Process 0 runs gRPC and
the engine core (on a thread) and sends each device step to process 1 (`serve/multihost.py`); the tokens must
be those of one process on one device, and SIGTERM to process 0 must stop both with exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import jax

from jaxinfer.config import EngineConfig
from jaxinfer.engine.llm import LLM
from jaxinfer.model_loader import load_model
from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jaxinfer_v1_pb2_grpc as pbg
from sharding.mesh import make_mesh

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]]
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_device_tokens() -> list[list[int]]:
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    loaded = load_model("dummy", mesh=mesh, dtype="float32", seed=0)
    llm = LLM.from_loaded(loaded, EngineConfig(page_size=16, num_pages=64, max_seq_len=128,
                                               dtype="float32", batch_buckets=(2,),
                                               prefill_buckets=(16,), prefill_rows=(2,),
                                               max_num_batched_tokens=32), mesh=mesh)
    reqs = [llm.request(p, max_tokens=MAX_TOKENS, ignore_eos=True) for p in PROMPTS]
    return [c[0].token_ids for c in llm.generate(reqs)]


@pytest.mark.slow  # multi-host steps: tests/sharding/test_multihost.py in the gate
def test_two_process_server_serves_one_device_tokens(tmp_path):
    want = _one_device_tokens()
    coord, grpc_port = _free_port(), _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    argv = [sys.executable, "-m", "serve", "--model", "dummy", "--mesh", "tp=2",
            "--port", str(grpc_port), "--batch-buckets", "2", "--prefill-buckets", "16",
            "--prefill-rows", "1", "--max-num-batched-tokens", "16", "--decode-steps", "2",
            "--num-pages", "64",  # 4 programs per process: warm-up is what costs here
            "--http-port", "0",
            "--coordinator", f"127.0.0.1:{coord}", "--num-processes", "2",
            "--step-port", str(_free_port())]
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(argv + ["--process-id", str(i)], cwd=REPO, env=env,
                              stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]

    def log(i: int) -> str:
        logs[i].flush()
        return (tmp_path / f"p{i}.log").read_text()[-3000:]

    try:
        deadline = time.monotonic() + 300
        while "SERVING on" not in log(0):
            assert time.monotonic() < deadline, log(0) + log(1)
            assert all(p.poll() is None for p in procs), log(0) + log(1)
            time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pbg.GenerationStub(channel)
            info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=30)
            assert info.mesh.tp == 2 and len(info.mesh.devices) == 2
            got = []
            for p in PROMPTS:
                r = stub.GenerateUnary(pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=p),
                    sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)),
                    timeout=120)
                got.append(list(r.completions[0].token_ids))
        assert got == want, (got, want)
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [0, 0], log(0) + log(1)
        assert "replaying the steps of process 0" in log(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()


def test_step_frames_round_trip():
    import numpy as np

    from serve.multihost import _recv, _send

    a, b = socket.socketpair()
    with a, b:
        arrays = {"tokens": np.arange(12, dtype=np.int32).reshape(3, 4),
                  "sample": np.array([True, False, True]),
                  "float_params": np.linspace(0, 1, 6, dtype=np.float32).reshape(1, 6),
                  "empty": np.zeros((0, 5), np.int32)}
        _send(a, "prefill", arrays, full=True)
        _send(a, "stop")
        call, got, flags = _recv(b)
        assert call == "prefill" and flags == {"full": True}
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
        assert _recv(b) == ("stop", {}, {})
