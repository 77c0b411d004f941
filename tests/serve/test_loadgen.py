"""The serving load generator: workload shapes and statistics by hand, the whole CLI against a
scripted in-process gRPC server (exact token counts), and a short run against the real
`python -m serve --model dummy`."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from serve import loadgen
from serve.loadgen import RequestResult, UsageError
from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jaxinfer_v1_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
RATE_METRICS = {"completed", "failed", "duration_s", "peak_in_flight", "req_s", "input_tok_s",
                "output_tok_s", "goodput_req_s", "slo_attainment"}
RULE17 = {"name", "model", "dtype", "quant", "mesh", "batch", "prompt_len", "gen_len", "metric",
          "value", "unit", "device", "jax_version", "git_sha"}


# -- pure pieces --------------------------------------------------------------------------------

def test_parse_rates():
    assert loadgen.parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("", "0", "-1", "x", "nan"):
        with pytest.raises(UsageError):
            loadgen.parse_rates(bad)


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert loadgen.sample_lengths(rng, 7, 5, "fixed", 0.5).tolist() == [7] * 5
    u = loadgen.sample_lengths(rng, 100, 4000, "uniform", 0.5)
    assert u.min() >= 50 and u.max() <= 150 and abs(u.mean() - 100) < 3
    assert len(set(u.tolist())) > 50
    n = loadgen.sample_lengths(rng, 100, 4000, "normal", 0.5)
    assert n.min() >= 1 and abs(n.mean() - 100) < 3 and 20 < n.std() < 30
    assert loadgen.sample_lengths(rng, 1, 100, "normal", 0.9).min() >= 1


def test_poisson_arrivals():
    rng = np.random.default_rng(1)
    t = loadgen.arrival_times(rng, 5000, 4.0)
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.25) < 0.02 and abs(gaps.std() - 0.25) < 0.03  # exponential
    assert loadgen.arrival_times(rng, 3, math.inf).tolist() == [0, 0, 0]


def test_load_dataset(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(["hello", "world"]))
    got = loadgen.load_dataset(p, 9)
    assert [(x.text, x.max_tokens) for x in got] == [("hello", 9), ("world", 9)]
    p = tmp_path / "b.jsonl"
    p.write_text('{"prompt": "hi", "max_tokens": 3}\n\n{"prompt": [5, 6]}\n')
    got = loadgen.load_dataset(p, 9)
    assert got[0].text == "hi" and got[0].max_tokens == 3
    assert got[1].token_ids == (5, 6) and got[1].max_tokens == 9
    for body in ('{"prompt": "a"}\nnot json\n', '{"text": "a"}\n', "[1, 2]", "[]",
                 '{"prompt": "a", "max_tokens": 0}\n', '{"prompt": ""}\n'):
        p.write_text(body)
        with pytest.raises(UsageError):
            loadgen.load_dataset(p, 9)
    with pytest.raises(UsageError):
        loadgen.load_dataset(tmp_path / "missing.json", 9)


def _result(ttft, itls, ok=True):
    n = len(itls) + 1
    return RequestResult(ok=ok, ttft=ttft, itls=list(itls), output_tokens=n, prompt_tokens=10,
                         e2e=ttft + sum(itls), error="" if ok else "boom")


def test_summarize_statistics_and_goodput():
    # TTFT 0.1 s, 0.2 s, 0.3 s; TPOT 0.01 s, 0.02 s, 0.05 s; one failed request.
    rs = [_result(0.1, [0.01] * 4), _result(0.2, [0.02] * 4), _result(0.3, [0.05] * 4),
          _result(0.05, [], ok=False)]
    got = {m: v for m, v, _ in loadgen.summarize(rs, 2.0, slo_ttft_ms=250, slo_tpot_ms=30,
                                                 peak_in_flight=3)}
    assert got["completed"] == 3 and got["failed"] == 1 and got["peak_in_flight"] == 3
    assert got["req_s"] == pytest.approx(1.5)
    assert got["output_tok_s"] == pytest.approx(15 / 2)
    assert got["input_tok_s"] == pytest.approx(30 / 2)
    assert got["ttft_ms_p50"] == pytest.approx(200) and got["ttft_ms_mean"] == pytest.approx(200)
    assert got["tpot_ms_p50"] == pytest.approx(20)
    assert got["e2e_ms_p99"] == pytest.approx(np.percentile([140, 280, 500], 99))
    assert got["itl_ms_p90"] == pytest.approx(np.percentile([10] * 4 + [20] * 4 + [50] * 4, 90))
    # only the first two meet TTFT <= 250 ms and TPOT <= 30 ms
    assert got["goodput_req_s"] == pytest.approx(1.0)
    assert got["slo_attainment"] == pytest.approx(2 / 3)
    no_slo = {m: v for m, v, _ in loadgen.summarize(rs, 2.0)}
    assert no_slo["goodput_req_s"] == pytest.approx(1.5)
    # single-token outputs have no TPOT or ITL rows
    one = {m for m, _, _ in loadgen.summarize([_result(0.1, [])], 1.0)}
    assert "ttft_ms_p50" in one and "tpot_ms_p50" not in one and "itl_ms_p50" not in one


@pytest.mark.parametrize("argv", [["--rates", "0"], ["--num-requests", "0"],
                                  ["--prompt-len-dist", "zipf"], ["--len-spread", "1.5"],
                                  ["--slo-ttft-ms", "-1"], ["--dataset", "/nonexistent.json"]])
def test_bad_flags_exit_2(argv):
    try:
        rc = loadgen.main(argv + ["--target", "127.0.0.1:1", "--connect-timeout", "0.5"])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_exits_1(capsys):
    rc = loadgen.main(["--target", f"127.0.0.1:{_free_port()}", "--connect-timeout", "0.5",
                       "--num-requests", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "cannot reach" in err[0]


# -- against a scripted server ----------------------------------------------------------------

class ScriptedServer(pb_grpc.GenerationServicer):
    """Streams max_tokens tokens two per message, 2 ms apart; fails prompts that start with 0."""

    def __init__(self):
        self.requests = []

    def ServerInfo(self, request, context):
        return pb.ServerInfoResponse(
            model=pb.ModelInfo(name="scripted", vocab_size=50, eos_token_ids=[1], bos_token_id=0,
                               dtype="float32"),
            mesh=pb.MeshInfo(dp=1, pp=1, tp=2, devices=["cpu:0", "cpu:1"]),
            limits=pb.Limits(max_seq_len=64, max_tokens=32), serving=True)

    def Generate(self, request, context):
        self.requests.append(request)
        ids = list(request.token_ids.ids)
        if ids[0] == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "scripted failure")
        n = request.sampling.max_tokens
        for start in range(0, n, 2):
            time.sleep(0.002)
            last = start + 2 >= n
            yield pb.GenerateResponse(
                token_ids=list(range(start, min(n, start + 2))),
                finish_reason=pb.FINISH_REASON_LENGTH if last else 0,
                usage=pb.Usage(prompt_tokens=len(ids), completion_tokens=n) if last else None)


@pytest.fixture
def scripted():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    servicer = ScriptedServer()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_cli_against_scripted_server(scripted, capsys, tmp_path):
    servicer, target = scripted
    rc = loadgen.main(["--target", target, "--rates", "50,inf", "--num-requests", "6",
                       "--prompt-len", "40", "--prompt-len-dist", "uniform", "--gen-len", "7",
                       "--warmup", "1", "--slo-ttft-ms", "10000", "--max-concurrency", "4"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = _rows(cap.out)
    assert all(RULE17 <= r.keys() for r in rows)
    assert {r["model"] for r in rows} == {"scripted"} and rows[0]["mesh"] == "dp=1,pp=1,tp=2"
    assert rows[0]["device"] == "cpu:0" and rows[0]["batch"] == 4
    by = {(r["rate"], r["metric"]): r["value"] for r in rows}
    for rate in ("50", "inf"):
        assert by[(rate, "completed")] == 6 and by[(rate, "failed")] == 0
        assert 1 <= by[(rate, "peak_in_flight")] <= 4
        # 7 tokens per request in messages of 2: TTFT, 3 ITL gaps, TPOT all present
        assert by[(rate, "output_tok_s")] == pytest.approx(
            6 * 7 / by[(rate, "duration_s")], rel=1e-3)
        assert by[(rate, "goodput_req_s")] == pytest.approx(by[(rate, "req_s")])
        for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert 0 < by[(rate, f"{m}_p50")] <= by[(rate, f"{m}_p90")] <= by[(rate, f"{m}_p99")]
        # the server sleeps 2 ms per message of 2 tokens: ~2 ms between messages, ITL counts
        # each of the 2 tokens a share of the gap (SGLang's accounting)
        assert by[(rate, "inter_message_ms_p50")] >= 1.5
        assert by[(rate, "itl_ms_p50")] == pytest.approx(by[(rate, "inter_message_ms_p50")] / 2,
                                                         rel=0.35)
    assert len(servicer.requests) == 1 + 2 * 6  # warm-up + both rates
    measured = servicer.requests[1:]
    lens = [len(r.token_ids.ids) for r in measured]
    assert min(lens) >= 20 and max(lens) <= 57 and len(set(lens)) > 1  # uniform, fits 64 - 7
    assert all(r.sampling.ignore_eos and r.sampling.max_tokens == 7 for r in measured)
    assert all(1 not in r.token_ids.ids and 0 not in r.token_ids.ids for r in measured)
    # fresh prompts per rate, so a prefix cache cannot make the second rate look faster
    assert {tuple(r.token_ids.ids) for r in measured[:6]}.isdisjoint(
        {tuple(r.token_ids.ids) for r in measured[6:]})
    table = cap.err.strip().splitlines()
    assert table[0].split()[0] == "rate" and [t.split()[0] for t in table[1:]] == ["50", "inf"]


def test_failed_requests_are_counted_and_all_failed_exits_1(scripted, capsys, tmp_path):
    _, target = scripted
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": [0, 5]}\n{"prompt": [3, 4], "max_tokens": 3}\n')
    rc = loadgen.main(["--target", target, "--rates", "inf", "--dataset", str(data),
                       "--num-requests", "4", "--warmup", "0"])
    cap = capsys.readouterr()
    by = {r["metric"]: r["value"] for r in _rows(cap.out)}
    assert rc == 0 and by["completed"] == 2 and by["failed"] == 2
    assert by["output_tok_s"] == pytest.approx(6 / by["duration_s"], rel=1e-3)
    data.write_text('{"prompt": [0, 5]}\n')
    rc = loadgen.main(["--target", target, "--rates", "inf", "--dataset", str(data),
                       "--warmup", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "INVALID_ARGUMENT: scripted failure" in err


def test_plot(scripted, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    _, target = scripted
    out = tmp_path / "lat.png"
    rc = loadgen.main(["--target", target, "--rates", "100,inf", "--num-requests", "3",
                       "--gen-len", "4", "--warmup", "0", "--plot", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_without_matplotlib_prints_notice(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert loadgen.plot([], tmp_path / "x.png") is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0]
    assert not (tmp_path / "x.png").exists()


# -- against the real server -------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_server():
    port, http_port = _free_port(), _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    # Small buckets keep the CPU warm-up short.
    flags = ["--max-seq-len", "64", "--num-pages", "64", "--decode-steps", "2",
             "--dtype", "float32", "--batch-buckets", "8", "--prefill-buckets", "32",
             "--prefill-rows", "1", "--max-num-batched-tokens", "64"]
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", "dummy", "--host",
                             "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
                             *flags], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow  # loadgen's parts are tested above without a server
def test_tiny_load_against_real_server(real_server, capsys):
    proc, target, _ = real_server
    rc = loadgen.main(["--target", target, "--rates", "20,inf", "--num-requests", "8",
                       "--prompt-len", "8", "--gen-len", "6", "--warmup", "1",
                       "--connect-timeout", "600"])  # returns once the server is up
    cap = capsys.readouterr()
    if rc != 0 and proc.poll() is not None:
        pytest.fail(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    assert rc == 0, cap.err
    rows = _rows(cap.out)
    assert rows and all(RULE17 <= r.keys() for r in rows)
    assert all(r["name"] == "serving" and r["model"] for r in rows)
    by = {(r["rate"], r["metric"]): r["value"] for r in rows}
    for rate in ("20", "inf"):
        assert RATE_METRICS <= {m for (rt, m) in by if rt == rate}
        assert by[(rate, "completed")] == 8 and by[(rate, "failed")] == 0
        assert by[(rate, "output_tok_s")] == pytest.approx(
            8 * 6 / by[(rate, "duration_s")], rel=1e-3)
        assert by[(rate, "input_tok_s")] == pytest.approx(
            8 * 8 / by[(rate, "duration_s")], rel=1e-3)
        for m in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert 0 < by[(rate, f"{m}_p50")] <= by[(rate, f"{m}_p99")]
        assert by[(rate, "ttft_ms_p50")] <= by[(rate, "e2e_ms_p50")]


def test_openai_backend_and_sharegpt_against_real_server(real_server, capsys, tmp_path):
    """The same server over its OpenAI HTTP API: synthetic token-id prompts, then a ShareGPT
    file whose gpt replies set each request's length (in the served model's tokens)."""
    proc, target, base = real_server
    rc = loadgen.main(["--backend", "openai", "--base-url", base, "--rates", "inf",
                       "--num-requests", "4", "--prompt-len", "8", "--gen-len", "5",
                       "--warmup", "0", "--connect-timeout", "600"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    by = {r["metric"]: r["value"] for r in _rows(cap.out)}
    assert by["completed"] == 4 and by["failed"] == 0
    assert by["output_tok_s"] == pytest.approx(4 * 5 / by["duration_s"], rel=1e-3)
    assert by["input_tok_s"] == pytest.approx(4 * 8 / by["duration_s"], rel=1e-3)
    assert 0 < by["ttft_ms_p50"] <= by["e2e_ms_p50"]
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "abc"}]},
        {"conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "abcdefg"}]},
        {"conversations": [{"from": "human", "value": "no reply"}]},  # skipped
    ]))
    rc = loadgen.main(["--backend", "openai", "--base-url", base, "--rates", "inf",
                       "--dataset", str(sharegpt), "--warmup", "0", "--connect-timeout", "60"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    by = {r["metric"]: r["value"] for r in _rows(cap.out)}
    # the dummy model's byte tokenizer: replies of 3 and 7 bytes are 3 and 7 tokens
    assert by["completed"] == 2
    assert by["output_tok_s"] == pytest.approx((3 + 7) / by["duration_s"], rel=1e-3)
