"""The soak and chaos harness (`serve/soak.py`): its checks catch what they should, a small
soak passes against the server the serve tests share (gRPC and HTTP on the real engine), and
(slow) the whole command against `python -m serve` ends in a drain under load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from serve import soak  # noqa: E402
from serve.soak_clients import Outcome  # noqa: E402
from tests.serve import server_harness as harness  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_checks_catch_wrong_lost_twice_and_unexpected():
    ref = [([5, 6, 7], "abc")]
    good = Outcome("grpc_stream", "grpc", "OK", 0, [5, 6, 7], "abc", 1, 0, "FINISH_REASON_LENGTH")
    cut = Outcome("grpc_cancel", "grpc", "CANCELLED", 0, [5, 6])
    http = Outcome("http_stream", "http", "OK", 0, [-1] * 3, "abc", 1, 0, "length")
    assert soak.classify([good, cut, http], ref, 3) == {"wrong": [], "lost": [], "twice": [],
                                                        "unexpected": []}
    bad = soak.classify([
        Outcome("grpc_stream", "grpc", "OK", 0, [5, 6, 8], "abd", 1, 0, "FINISH_REASON_LENGTH"),
        Outcome("grpc_cancel", "grpc", "CANCELLED", 0, [6]),  # not a prefix
        Outcome("http_stream", "http", "OK", 0, [-1] * 3, "abc", 0, 0, ""),  # no finish
        Outcome("grpc_unary", "grpc", "OK", 0, [5, 6, 7], "abc", 1, 2, "FINISH_REASON_LENGTH"),
        Outcome("grpc_stream", "grpc", "INTERNAL", 0),
        Outcome("http_stream", "http", "HTTP 500", 0),
    ], ref, 3)
    assert [len(bad[k]) for k in ("wrong", "lost", "twice", "unexpected")] == [2, 1, 1, 2]


def test_token_counts_past_the_servers_limits_are_a_usage_error():
    limits = soak.pb.Limits(max_seq_len=512, max_tokens=512)
    args = soak.build_parser().parse_args(["--drain-tokens", "488"])
    soak.check_tokens(args, limits)  # 24-token prompt + 488 = 512: fits
    args = soak.build_parser().parse_args(["--drain-tokens", "1024"])
    with pytest.raises(soak.UsageError, match="--drain-tokens 1024 is more than .* \\(488"):
        soak.check_tokens(args, limits)


def test_stalled_clients_never_take_every_slot():
    """More stalled clients than slots: they hold none and are let go in waves, so the plain
    requests behind them still run (with slots held by stalled clients, the 60,000-request H200
    soak deadlocked once 1,000 of them were parked)."""
    import asyncio
    import types

    s = soak.Soak.__new__(soak.Soak)
    s.hold, s.args = asyncio.Event(), types.SimpleNamespace(request_timeout=5.0)
    waves = []

    async def client(kind, hold):
        if kind.endswith("_stalled"):
            await hold.wait()
            waves.append(hold)  # (kept alive, so their ids stay distinct)
        return Outcome(kind, "grpc", "OK", 0)

    s.run_kind = lambda kind: client(kind, s.hold)
    kinds = (["grpc_stalled"] * 3 + ["grpc_stream"]) * 10

    async def main():
        s.hold = asyncio.Event()
        return await asyncio.wait_for(s.run_many(kinds, concurrency=4), 10)

    results = asyncio.run(main())
    assert sorted(o.kind for o in results) == sorted(kinds)
    assert len({id(h) for h in waves}) == 30  # waves of concurrency // 4 = 1: each parked one let go


def test_small_soak_on_the_shared_server(request):
    """A few hundred requests of every kind at once, a burst past the queue, then idle
    metrics and RSS: the CI version of the soak (the drain under load is the slow test below;
    test_server.py's test_sigterm_drains_then_exits_0 covers the drain in the gate)."""
    real = harness.shared_http_front(request.config)
    args = soak.build_parser().parse_args([
        "--target", real.bg.target, "--http-url", f"http://127.0.0.1:{real.http_port}",
        "--requests", "300", "--concurrency", "200", "--max-tokens", "12", "--prompts", "8",
        "--warmup", "32", "--duration", "60", "--burst", "2", "--slow-interval", "0.3",
        "--request-timeout", "120", "--connect-timeout", "30", "--stalled", "40",
        "--stalled-tokens", "48", "--stalled-requests", "40", "--stalled-concurrency", "4",
        "--stalled-ttft-ratio", "3"])  # (a shared 2-core CI machine: the record holds 2x)
    import asyncio

    rows, failed = asyncio.run(soak.run(args, []))
    assert failed == []
    checks = {r["check"] for r in rows if "check" in r}
    assert {"wrong", "lost", "twice", "unexpected", "health_s_max", "rss_growth",
            "jaxinfer_kv_pages_used", "ttft_p99_ratio"} <= checks
    stalled = {(r["kind"], r["code"]): r["value"] for r in rows
               if r.get("phase") == "stalled" and "kind" in r}
    assert stalled[("grpc_stream", "OK")] + stalled[("http_stream", "OK")] == 80
    assert stalled[("http_stalled", "STALLED")] == 20
    seen = {(r["kind"], r["code"]) for r in rows if "kind" in r}
    # the chaos happened: answers checked on both fronts, cuts, refusals of bad input
    assert {("grpc_stream", "OK"), ("http_stream", "OK"), ("grpc_cancel", "CANCELLED"),
            ("http_disconnect", "DISCONNECTED"), ("http_stalled", "STALLED"),
            ("grpc_malformed", "INVALID_ARGUMENT"), ("http_malformed", "HTTP 400")} <= seen
    done = next(r["value"] for r in rows if r["metric"] == "requests_done")
    assert done == 300


@pytest.mark.slow  # the gate runs test_small_soak_on_the_shared_server and test_server.py's
#                    test_sigterm_drains_then_exits_0 instead
def test_soak_command_with_drain_under_load(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "serve.soak", "--requests", "400", "--concurrency", "200",
         "--max-tokens", "16", "--prompts", "8", "--warmup", "32", "--burst", "4",
         "--sigterm", "--drain-streams", "200", "--server-log", str(tmp_path / "serve.log"),
         "--", "--model", "demo", "--max-queue", "256"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
    assert '"check": "exit_code", "ok": true' in r.stdout
