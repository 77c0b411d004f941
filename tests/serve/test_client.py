"""`python -m serve.client` against an in-process server over the stub engine (the client does
not care which engine answers; the server tests cover the real one)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxinfer.config import ServeConfig
from serve import client
from tests.serve import server_harness as harness
from tests.serve.stub_engine import StubEngine, expected_tokens

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server():
    bg = harness.BackgroundServer(StubEngine(tick=0.002), ServeConfig(port=0))
    yield bg
    bg.close()


class _TimedOut(io.StringIO):
    """Records when each write happened."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def write(self, s: str) -> int:
        self.times.append(time.monotonic())
        return super().write(s)


def _run(server, *argv: str) -> str:
    out = _TimedOut()
    client.run(client.build_parser().parse_args(["--target", server.target, *argv]), out=out)
    return out.getvalue()


def test_stream_prints_pieces_as_they_arrive(server):
    server.engine.tick = 0.03
    out = _TimedOut()
    args = client.build_parser().parse_args(["--target", server.target, "--prompt-ids", "1,2",
                                             "--stream", "--max-tokens", "12"])
    client.run(args, out=out)
    server.engine.tick = 0.002
    want = "".join(map(chr, expected_tokens([1, 2], 12)))
    assert out.getvalue() == want + "\n"
    pieces = out.times[:-1]  # the last write is the closing newline
    # Spread over the stream (12 tokens 30 ms apart): a loaded machine may merge a few
    # messages, but never all of them into one write at the end.
    assert len(pieces) >= 2 and pieces[-1] - pieces[0] > 0.1


def test_unary_text_ids_and_json(server):
    assert _run(server, "--prompt", "ab", "--max-tokens", "4") == "".join(
        map(chr, expected_tokens([256, 97, 98], 4))) + "\n"
    ids = _run(server, "--prompt-ids", "5", "--max-tokens", "3", "--ids")
    assert ids.split() == [str(t) for t in expected_tokens([5], 3)]
    two = _run(server, "--prompt-ids", "5", "--max-tokens", "2", "--n", "2")
    assert two.splitlines() == [f"[{i}] " + "".join(map(chr, expected_tokens([5], 2, i)))
                                for i in range(2)]
    lines = _run(server, "--prompt-ids", "5", "--max-tokens", "3", "--stream", "--json")
    msgs = [json.loads(x) for x in lines.splitlines()]
    assert msgs[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert msgs[-1]["usage"]["completionTokens"] == 3
    info = json.loads(_run(server, "--info"))
    assert info["serving"] and info["limits"]["maxSeqLen"] == 256


def test_cli_subprocess_and_error_line(server):
    r = subprocess.run([sys.executable, "-m", "serve.client", "--target", server.target,
                        "--prompt-ids", "3", "--max-tokens", "5", "--stream"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(map(chr, expected_tokens([3], 5))) + "\n"
    r = subprocess.run([sys.executable, "-m", "serve.client", "--target", server.target,
                        "--prompt", "", "--max-tokens", "5"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == "serve.client: error: INVALID_ARGUMENT: prompt text is empty"
