"""`python -m serve` as a subprocess: SIGTERM drains in-flight streams and exits 0, SIGTERM
during warm-up exits at once, and an engine core that dies ends its streams UNAVAILABLE and the
server exits 1 (split from test_server.py, which tests the server in-process)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jaxinfer_v1_pb2_grpc as pbg
from tests.serve.server_harness import REPO
from tests.serve.server_harness import status_code as _code
from tests.serve.server_harness import subprocess_env as _env
from tests.serve.server_harness import wait_for as _wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Lines:
    """Collect a subprocess's stderr lines on a thread; wait for a pattern."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    def wait(self, pattern: str, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = end - time.monotonic()
                assert left > 0, f"no {pattern!r} in:\n{''.join(self.lines[-30:])}"
                self._cv.wait(left)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(base: str, path: str, body: dict | None = None):
    """(status, response) of an HTTP call; a streamed body is returned open."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        r = urllib.request.urlopen(req, timeout=30)
        return r.status, r
    except urllib.error.HTTPError as e:
        return e.code, e


def test_sigterm_drains_then_exits_0():
    """gRPC and the OpenAI HTTP API of one `python -m serve` (what --http-port and
    --served-model-name set up): health of both through warm-up, serving and drain; streams
    of both protocols in flight at SIGTERM finish."""
    http_port = _free_port()
    cmd = [sys.executable, "-m", "serve", "--model", "dummy", "--port", "0", "--metrics-port",
           "0", "--max-seq-len", "512", "--num-pages", "64", "--batch-buckets", "4",
           "--prefill-buckets", "16", "--prefill-rows", "1",
           "--max-num-batched-tokens", "16", "--page-buckets", "32",
           "--http-port", str(http_port), "--served-model-name", "tiny", "other-name"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    lines = _Lines(proc.stderr)
    base = f"http://127.0.0.1:{http_port}"
    try:
        port = lines.wait(r"listening on [\d.]+:(\d+)", 120).group(1)
        lines.wait(r"HTTP \(OpenAI API\) on http://127\.0\.0\.1:" + str(http_port), 30)
        http_health = [_http(base, "/health")[0]]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pbg.GenerationStub(ch)
            statuses = [health.Check(health_pb2.HealthCheckRequest(), timeout=10).status]
            lines.wait(r"SERVING on 127\.0\.0\.1:" + port, 300)
            statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=10).status)
            http_health.append(_http(base, "/health")[0])
            status, models = _http(base, "/v1/models")
            assert [m["id"] for m in json.load(models)["data"]] == ["tiny", "other-name"]
            completion = {"model": "other-name", "prompt": [1, 2, 3], "max_tokens": 300,
                          "ignore_eos": True, "stream": True}
            status, sse = _http(base, "/v1/completions", completion)
            assert status == 200 and sse.readline().startswith(b"data: {")
            metrics_port = lines.wait(r"metrics on http://[\d.]+:(\d+)", 5).group(1)
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=10).read().decode()
            assert "jaxinfer_kv_pages_free" in body
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                     sampling=pb.SamplingParams(max_tokens=500,
                                                                ignore_eos=True))
            stream = stub.Generate(req, timeout=120)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            lines.wait(r"draining: 2 call\(s\) in flight", 30)  # gRPC and HTTP: still running
            _wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(),
                                           timeout=10).status == NOT_SERVING,
                      what="NOT_SERVING while draining")
            statuses.append(NOT_SERVING)
            code, details = _code(lambda: next(stub.Generate(req, timeout=10)))
            assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details, details
            http_health.append(_http(base, "/health")[0])
            status, refused = _http(base, "/v1/completions", {**completion, "stream": False})
            assert status == 503 and "draining" in json.load(refused)["error"]["message"]
            events = [x for x in sse.read().decode().split("\n\n") if x]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
            rest = list(stream)
        tokens = [t for m in [first, *rest] for t in m.token_ids]
        assert len(tokens) == 500 and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert statuses == [NOT_SERVING, SERVING, NOT_SERVING]
        assert http_health == [503, 200, 503]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_warm_up_exits_0_at_once():
    cmd = [sys.executable, "-m", "serve", "--model", "dummy", "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    lines = _Lines(proc.stderr)
    try:
        lines.wait(r"listening on", 120)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 10  # did not sit out the warm-up
        lines.wait(r"SIGTERM during warm-up: exiting", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_core_death_ends_streams_unavailable_and_the_server_exits_1():
    """The engine core runs in its own process (the front imports no JAX at all); killed
    mid-stream, every client gets UNAVAILABLE within 5 s and the server exits non-zero."""
    cmd = [sys.executable, "-m", "serve", "--model", "dummy", "--port", "0", "--max-seq-len",
           "512", "--num-pages", "64", "--batch-buckets", "4", "--prefill-buckets", "16",
           "--prefill-rows", "1", "--max-num-batched-tokens", "16", "--decode-steps", "2",
           "--http-port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    lines = _Lines(proc.stderr)
    try:
        port = lines.wait(r"SERVING on 127\.0\.0\.1:(\d+)", 300).group(1)
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "jaxlib" not in f.read()  # the front never loaded JAX
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.GenerationStub(ch)
            info = json.loads(stub.ServerInfo(pb.ServerInfoRequest(), timeout=10).engine_json)
            [core_pid] = info["engine_pids"]
            assert core_pid != proc.pid
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                     sampling=pb.SamplingParams(max_tokens=500,
                                                                ignore_eos=True))
            streams = [stub.Generate(req, timeout=120) for _ in range(3)]
            for s in streams:
                next(s)
            t0 = time.monotonic()
            os.kill(core_pid, signal.SIGKILL)
            for s in streams:
                with pytest.raises(grpc.RpcError) as err:
                    list(s)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "exited with code" in err.value.details()
            assert time.monotonic() - t0 < 5
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
