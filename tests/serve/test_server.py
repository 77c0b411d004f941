"""The gRPC server over real gRPC on loopback.

Most tests share ONE server on the real engine with the dummy model (`server_harness`): 200
concurrent streams against offline greedy generation, cancellation and deadlines freeing pages,
every bad input's status code, reflection, health, metrics, zero recompiles. `python -m serve`
itself runs as a subprocess for SIGTERM drain and health transitions in
test_server_process.py. Paths the real engine cannot be made to take on purpose (an engine
failure inside one request, a full queue at a known moment, a model without a tokenizer, TLS)
use the hand-computable `StubEngine`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxinfer.config import ServeConfig
from jaxinfer.errors import ConfigError
from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jaxinfer_v1_pb2_grpc as pbg
from serve.protos import jetstream_pb2 as js
from serve.protos import jetstream_pb2_grpc as jsg
from tests.serve import server_harness as harness
from tests.serve.server_harness import status_code as _code
from tests.serve.server_harness import subprocess_env as _env
from tests.serve.server_harness import wait_for as _wait_for
from tests.serve.stub_engine import FAIL_TOKEN, StubEngine, expected_tokens

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- no server -----------------------------------------------------------------------------


def test_committed_stubs_match_protos():
    from serve.protos import generate

    assert generate.stale_files() == [], "run: python serve/protos/generate.py"
    text = (REPO / "serve/protos/jaxinfer_v1_pb2_grpc.py").read_text()
    assert "from . import jaxinfer_v1_pb2" in text  # package-relative


def test_serve_config_checks():
    with pytest.raises(ConfigError, match="both a certificate and a key"):
        ServeConfig(tls_cert="c.pem")
    with pytest.raises(ConfigError, match="max_message_bytes"):
        ServeConfig(max_message_bytes=10)
    with pytest.raises(ConfigError, match="port"):
        ServeConfig(port=70000)
    assert ServeConfig().host == "127.0.0.1"


def test_cli_derives_engine_flags():
    from serve.__main__ import build_parser, engine_config

    args = build_parser().parse_args(["--model", "dummy", "--page-size", "8", "--batch-buckets",
                                      "1,4", "--kernels", "reference", "--unroll-layers", "2"])
    cfg = engine_config(args, default_dtype="float32")
    assert (cfg.page_size, cfg.batch_buckets, cfg.unroll_layers, cfg.dtype) == (8, (1, 4), 2,
                                                                               "float32")
    assert args.host == "127.0.0.1" and args.port == 50051


def test_cli_bad_flags_one_line_exit_1():
    r = subprocess.run([sys.executable, "-m", "serve", "--model", "dummy", "--tls-cert", "x.pem"],
                       cwd=REPO, capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "serve: error: TLS needs both a certificate and a key (--tls-cert and --tls-key)"]
    r = subprocess.run([sys.executable, "-m", "serve", "--model", "/no/such/model"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("serve: error: --model '/no/such/model'")


# -- stub engine: paths the real engine cannot be steered into -------------------------------


@pytest.fixture()
def stub_server():
    bg = harness.BackgroundServer(StubEngine(tick=0.002),
                                  ServeConfig(port=0, max_message_bytes=64 * 1024))
    yield bg
    bg.close()


def test_stub_stream_matches_hand_computed_tokens(stub_server):
    stub = pbg.GenerationStub(stub_server.channel())
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), request_id="mine",
                             sampling=pb.SamplingParams(max_tokens=6, n=2, logprobs=2))
    msgs = list(stub.Generate(req, timeout=10))
    for i in range(2):
        got = [t for m in msgs if m.index == i for t in m.token_ids]
        assert got == expected_tokens([5, 6, 7], 6, i)
    assert all(m.request_id == "mine" for m in msgs)
    assert [m.finish_reason for m in msgs if m.finish_reason] == [pb.FINISH_REASON_LENGTH] * 2
    assert msgs[-1].usage.completion_tokens == 12 and msgs[-1].usage.prompt_tokens == 3
    assert all(len(m.logprobs) == len(m.token_ids) and len(m.logprobs[0].top) == 2
               for m in msgs)
    unary = stub.GenerateUnary(req, timeout=10)
    assert [list(c.token_ids) for c in unary.completions] == [
        expected_tokens([5, 6, 7], 6, i) for i in range(2)]
    # logprobs=0: the chosen token's logprob only
    req0 = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]),
                              sampling=pb.SamplingParams(max_tokens=2, logprobs=0))
    one = stub.GenerateUnary(req0, timeout=10).completions[0]
    assert len(one.logprobs) == 2 and all(len(lp.top) == 0 for lp in one.logprobs)


def test_stub_stop_string_cuts_text(stub_server):
    stub = pbg.GenerationStub(stub_server.channel())
    prompt = [1]  # generates b, c, d, e, ...
    out = stub.GenerateUnary(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=10, stop=["d"])),
        timeout=10).completions[0]
    assert out.text == "bc" and out.finish_reason == pb.FINISH_REASON_STOP


def test_engine_failure_fails_that_request_only(stub_server):
    stub = pbg.GenerationStub(stub_server.channel())
    code, details = _code(lambda: list(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[FAIL_TOKEN]), sampling=pb.SamplingParams(max_tokens=3)),
        timeout=10)))
    assert code == grpc.StatusCode.INTERNAL and "injected failure" in details
    ok = stub.GenerateUnary(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3]),
                                               sampling=pb.SamplingParams(max_tokens=3)),
                            timeout=10)
    assert list(ok.completions[0].token_ids) == expected_tokens([3], 3)


def test_queue_full_is_resource_exhausted(stub_server):
    engine = stub_server.engine
    engine.tick = 0.05  # nothing finishes while the queue fills
    stub = pbg.GenerationStub(stub_server.channel())
    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                              sampling=pb.SamplingParams(max_tokens=200))
    calls = [stub.Generate(long, timeout=30) for _ in range(engine.max_running + engine.max_queue)]
    _wait_for(lambda: engine.stats()["waiting"] == engine.max_queue, what="a full queue")
    code, details = _code(lambda: next(stub.Generate(long, timeout=10)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in details
    for c in calls:
        c.cancel()
    _wait_for(lambda: engine.stats()["pages_used"] == 0, what="pages freed")


def test_burst_far_past_the_queue_gets_documented_codes():
    """3,000 calls at once against a queue of 8: each is served or refused RESOURCE_EXHAUSTED
    (none cancelled by gRPC core before the server sees it, as its default pending-call limit
    did), and health answers meanwhile."""
    import asyncio
    import collections

    engine = StubEngine(tick=0.002, max_queue=8, max_running=4)
    bg = harness.BackgroundServer(engine, ServeConfig(port=0, max_queue=8))

    async def burst():
        channels = [grpc.aio.insecure_channel(bg.target) for _ in range(4)]
        codes: collections.Counter = collections.Counter()

        async def one(i: int) -> None:
            try:
                await pbg.GenerationStub(channels[i % 4]).GenerateUnary(pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(max_tokens=2)),
                    timeout=60)
                codes[grpc.StatusCode.OK] += 1
            except grpc.aio.AioRpcError as e:
                codes[e.code()] += 1

        calls = asyncio.gather(*(one(i) for i in range(3000)))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        status = await health_pb2_grpc.HealthStub(channels[0]).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
        health_s = time.monotonic() - t0
        await calls
        for c in channels:
            await c.close()
        return codes, status.status, health_s

    try:
        codes, status, health_s = asyncio.run(burst())
    finally:
        bg.close()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0 and sum(codes.values()) == 3000
    assert status == SERVING and health_s < 5


def test_engine_deadline_is_deadline_exceeded(stub_server):
    """The engine drops a request whose deadline passed: the call ends DEADLINE_EXCEEDED with
    the server's own message, and its pages are free."""
    engine = stub_server.engine
    engine.tick = 0.02  # 200 tokens take 4 s
    stub = pbg.GenerationStub(stub_server.channel())
    t0 = time.monotonic()
    code, _ = _code(lambda: list(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1]), sampling=pb.SamplingParams(max_tokens=200)),
        timeout=0.3)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 3
    _wait_for(lambda: engine.stats()["pages_used"] == 0, what="pages freed")


def test_client_cancel_cancels_in_engine(stub_server):
    engine = stub_server.engine
    engine.tick = 0.01
    stub = pbg.GenerationStub(stub_server.channel())
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                                            sampling=pb.SamplingParams(max_tokens=200)),
                         timeout=30)
    next(call)
    assert engine.stats()["pages_used"] > 0
    call.cancel()
    _wait_for(lambda: engine.stats()["pages_used"] == 0, what="pages freed")
    assert [r for _, r in engine.cancelled] == ["cancelled"]


def test_stream_buffer_is_one_merged_piece_per_sample():
    """Outputs the handler has not taken are merged as they arrive: a client that falls behind
    costs the request's tokens, never a growing queue of messages."""
    import asyncio

    from jaxinfer.engine.request import Output, Request
    from serve.server import _Submission

    async def run():
        loop = asyncio.get_running_loop()
        req = Request(request_id="r", prompt_ids=[1], max_tokens=500, n=2)
        sub = _Submission(StubEngine(), req, loop)
        for j in range(500):
            for i in range(2):
                sub._push(Output(request_id="r", index=i, token_ids=(j,), text=chr(97 + j % 26),
                                 finish_reason="length" if j == 499 else None))
        assert len(sub._pending) == 2
        batch = await sub.next_batch()
        assert [o.token_ids for o in batch] == [tuple(range(500))] * 2
        assert batch[0].text == "".join(chr(97 + j % 26) for j in range(500))
        assert sub.finished and sub.completion_tokens == 1000

    asyncio.run(run())


def test_client_that_stops_reading_is_cancelled_after_stream_timeout():
    """A client that reads nothing fills its HTTP/2 window; the server's write then waits, and
    after --stream-timeout the stream is cancelled (pages freed, a log line, a metric) while a
    well-behaved client on another channel is served as usual. The client sees CANCELLED if
    it ever reads again."""
    from serve.metrics import PrometheusMetrics

    engine = StubEngine(tick=0.005, max_tokens=4000, max_seq_len=4096, num_pages=2048)
    metrics = PrometheusMetrics()
    bg = harness.BackgroundServer(engine, ServeConfig(port=0, stream_timeout=1.0),
                                  metrics=metrics)
    # BDP probing off keeps the client's window at 64 KiB (with it, gRPC grows it to a few
    # MiB, which a real model fills too, only later)
    stalled = grpc.insecure_channel(bg.target, options=[("grpc.http2.bdp_probe", 0)])
    try:
        call = pbg.GenerationStub(stalled).Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[1]),
            sampling=pb.SamplingParams(max_tokens=4000, n=4, logprobs=5)), timeout=60)
        next(call)
        t0 = time.monotonic()
        good = pbg.GenerationStub(bg.channel()).GenerateUnary(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[2]), sampling=pb.SamplingParams(max_tokens=50)),
            timeout=30)
        assert list(good.completions[0].token_ids) == expected_tokens([2], 50)
        assert time.monotonic() - t0 < 5  # 50 ticks of 5 ms, not held up by the stalled one
        _wait_for(lambda: engine.cancelled, timeout=30, what="the stalled stream cancelled")
        assert [r for _, r in engine.cancelled] == ["cancelled"]
        _wait_for(lambda: engine.stats()["pages_used"] == 0, what="pages freed")
        body = metrics.render().decode()
        assert 'jaxinfer_stalled_streams_total{front="gRPC Generate"} 1.0' in body
        code, details = _code(lambda: list(call))
        assert code == grpc.StatusCode.CANCELLED and "read nothing for 1 s" in details
    finally:
        stalled.close()
        bg.close()


def test_no_tokenizer_text_is_failed_precondition():
    bg = harness.BackgroundServer(StubEngine(with_tokenizer=False))
    try:
        stub = pbg.GenerationStub(bg.channel())
        code, details = _code(lambda: stub.GenerateUnary(pb.GenerateRequest(text="hi"),
                                                         timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no tokenizer" in details
        code, _ = _code(lambda: stub.Tokenize(pb.TokenizeRequest(text="hi"), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        ids = stub.GenerateUnary(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2]),
                                                    sampling=pb.SamplingParams(max_tokens=2)),
                                 timeout=10)
        assert ids.completions[0].text == "" and len(ids.completions[0].token_ids) == 2
    finally:
        bg.close()


def test_health_and_unavailable_through_warm_up_and_drain():
    engine = StubEngine(tick=0.01)
    bg = harness.BackgroundServer(engine, warm=False)
    try:
        channel = bg.channel()
        health = health_pb2_grpc.HealthStub(channel)
        stub = pbg.GenerationStub(channel)
        jet = jsg.OrchestratorStub(channel)
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                                 sampling=pb.SamplingParams(max_tokens=40))
        for name in ("", "jaxinfer.v1.Generation", "jetstream_proto.Orchestrator"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == NOT_SERVING
        assert not jet.HealthCheck(js.HealthCheckRequest(), timeout=5).is_live
        code, details = _code(lambda: next(stub.Generate(req, timeout=5)))
        assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in details

        bg.warm_up()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        assert jet.HealthCheck(js.HealthCheckRequest(), timeout=5).is_live

        in_flight = stub.Generate(req, timeout=30)
        first = next(in_flight)
        bg.loop.call_soon_threadsafe(bg.server.request_shutdown_state)  # as SIGTERM does
        drained = futures.ThreadPoolExecutor(1).submit(bg.drain, 30)
        _wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(),
                                       timeout=5).status == NOT_SERVING, what="NOT_SERVING")
        code, details = _code(lambda: next(stub.Generate(req, timeout=5)))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
        rest = list(in_flight)
        assert [t for m in [first, *rest] for t in m.token_ids] == expected_tokens([1], 40)
        assert drained.result(30) is True
    finally:
        bg.close()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither cryptography nor openssl is available to make a certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        return cert, key
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(pkey.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
         .sign(pkey, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert, key


def test_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    bg = harness.BackgroundServer(StubEngine(), ServeConfig(port=0, tls_cert=str(cert),
                                                            tls_key=str(key)))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{bg.port}", creds) as channel:
            info = pbg.GenerationStub(channel).ServerInfo(pb.ServerInfoRequest(), timeout=10)
            assert info.serving
        with grpc.insecure_channel(bg.target) as plain:  # plaintext is refused
            code, _ = _code(lambda: pbg.GenerationStub(plain).ServerInfo(pb.ServerInfoRequest(),
                                                                         timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        bg.close()
    with pytest.raises(ConfigError, match="--tls-key"):
        harness.BackgroundServer(StubEngine(), ServeConfig(port=0, tls_cert=str(cert),
                                                           tls_key=str(tmp_path / "none.pem")))


def test_port_in_use_is_a_config_error(stub_server):
    with pytest.raises(ConfigError, match="cannot listen"):
        harness.BackgroundServer(StubEngine(), ServeConfig(port=stub_server.port))


# -- the real engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(request):
    return harness.shared_real_server(request.config)


@pytest.fixture()
def channel(real):
    with real.bg.channel() as ch:
        yield ch


def test_200_concurrent_streams_match_offline_generation(real):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=int(rng.integers(1, 20))).tolist() for _ in range(200)]
    max_tokens = 12
    want = real.offline(prompts, max_tokens)
    got: list[list[int] | None] = [None] * len(prompts)
    messages = [0] * len(prompts)
    errors = []

    def run(i: int, stub) -> None:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[i]),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens))
        toks = []
        try:
            for msg in stub.Generate(req, timeout=120):
                toks += msg.token_ids
                messages[i] += 1
        except grpc.RpcError as e:
            errors.append((i, e.code(), e.details()))
        got[i] = toks

    with real.bg.channel() as ch:
        stub = pbg.GenerationStub(ch)
        # every call is open at once: the threads only wait on their streams
        threads = [threading.Thread(target=run, args=(i, stub)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
    assert not errors, errors[:3]
    mismatched = [i for i in range(len(prompts)) if got[i] != want[i]]
    assert not mismatched, [(i, got[i], want[i]) for i in mismatched[:3]]
    assert max(messages) > 1  # streamed, not sent in one piece
    _wait_for(lambda: real.pages_used() == 0, what="all pages back")


def test_text_prompt_streams_text(real, channel):
    stub = pbg.GenerationStub(channel)
    msgs = list(stub.Generate(pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(
        max_tokens=10, ignore_eos=True)), timeout=60))
    ids = [t for m in msgs for t in m.token_ids]
    assert len(ids) == 10 and msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert "".join(m.text for m in msgs) == real.tokenizer.decode(ids)
    prompt = real.tokenizer.encode("Hello")
    assert msgs[-1].usage.prompt_tokens == len(prompt)
    offline = real.offline([prompt], 10)[0]  # stops early only at EOS, which ignore_eos passes
    assert ids[:len(offline)] == offline


def test_tokenize_detokenize_and_server_info(real, channel):
    stub = pbg.GenerationStub(channel)
    ids = list(stub.Tokenize(pb.TokenizeRequest(text="héllo"), timeout=10).token_ids)
    assert ids == real.tokenizer.encode("héllo")
    no_bos = list(stub.Tokenize(pb.TokenizeRequest(text="a", add_bos=False), timeout=10).token_ids)
    assert no_bos == [97]
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), timeout=10).text == "héllo"
    info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=10)
    assert info.serving and info.model.name == "dummy" and info.model.vocab_size == 512
    assert info.limits.max_seq_len == harness.MAX_SEQ_LEN
    assert info.limits.max_queue == harness.MAX_QUEUE
    assert info.limits.max_message_bytes == harness.MAX_MESSAGE_BYTES
    assert info.buckets and all(b.sizes for b in info.buckets.values())
    assert (info.mesh.dp, info.mesh.pp, info.mesh.tp) == (1, 1, 1)
    assert list(info.mesh.devices) == ["cpu:cpu"]  # loadgen rows name the device from this
    assert json.loads(info.engine_json)


def _bad_requests(max_seq: int) -> list[tuple[str, pb.GenerateRequest, str]]:
    S = pb.SamplingParams
    ids = pb.TokenIds

    def r(**kw):
        kw.setdefault("token_ids", ids(ids=[1, 2, 3]))
        return pb.GenerateRequest(**kw)

    return [
        ("no prompt", pb.GenerateRequest(), "set either text or token_ids"),
        ("empty text", pb.GenerateRequest(text=""), "empty"),
        ("empty ids", pb.GenerateRequest(token_ids=ids()), "empty"),
        ("id over vocab", r(token_ids=ids(ids=[1, 512])), "outside the vocabulary"),
        ("negative id", r(token_ids=ids(ids=[-1])), "outside the vocabulary"),
        ("over context", r(token_ids=ids(ids=[1] * (max_seq - 10)), sampling=S(max_tokens=11)),
         "exceeds the context limit"),
        ("prompt fills context", r(token_ids=ids(ids=[1] * max_seq)), "no room"),
        ("max_tokens 0", r(sampling=S(max_tokens=0)), "max_tokens must be >= 1"),
        ("temperature < 0", r(sampling=S(temperature=-1)), "temperature must be >= 0"),
        ("temperature nan", r(sampling=S(temperature=math.nan)), "finite"),
        ("top_p 0", r(sampling=S(top_p=0)), "top_p must be in (0, 1]"),
        ("top_p > 1", r(sampling=S(top_p=1.5)), "top_p must be in (0, 1]"),
        ("top_k < -1", r(sampling=S(top_k=-2)), "top_k"),
        ("min_p > 1", r(sampling=S(min_p=2)), "min_p"),
        ("repetition 0", r(sampling=S(repetition_penalty=0)), "repetition_penalty"),
        ("presence > 2", r(sampling=S(presence_penalty=3)), "presence_penalty"),
        ("frequency < -2", r(sampling=S(frequency_penalty=-3)), "frequency_penalty"),
        ("n too large", r(sampling=S(n=100000)), "sampling.n 100000 exceeds the server limit"),
        ("logprobs too many", r(sampling=S(logprobs=100000)), "logprobs"),
        ("empty stop string", r(sampling=S(stop=[""])), "stop"),
        ("too many stops", r(sampling=S(stop=[str(i) for i in range(17)])), "at most 16"),
        ("stop id over vocab", r(sampling=S(stop_token_ids=[9999])), "outside the vocabulary"),
        ("seed overflow", r(sampling=S(seed=2**63 - 1, n=2)), "sampling.seed"),
        ("long request id", r(request_id="x" * 300), "request_id"),
    ]


@pytest.mark.parametrize("case", range(24))
def test_bad_request_is_invalid_argument(real, channel, case):
    name, req, match = _bad_requests(harness.MAX_SEQ_LEN)[case]
    stub = pbg.GenerationStub(channel)
    for call in (lambda: list(stub.Generate(req, timeout=10)),
                 lambda: stub.GenerateUnary(req, timeout=10)):
        code, details = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert match in details, (name, details)


def test_bad_request_table_is_complete():
    assert len(_bad_requests(128)) == 24  # the parametrize range above


def test_undecodable_bytes_are_invalid_argument(real, channel):
    raw = pb.GenerateRequest(text="abc").SerializeToString().replace(b"abc", b"a\xffc")
    generate = channel.unary_stream("/jaxinfer.v1.Generation/Generate")
    code, details = _code(lambda: list(generate(raw, timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details
    code, details = _code(lambda: list(generate(b"\xff\xff\xff", timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot parse" in details
    tokenize = channel.unary_unary("/jaxinfer.v1.Generation/Tokenize")
    bad_text = pb.TokenizeRequest(text="abc").SerializeToString().replace(b"abc", b"\xc3(c")
    code, _ = _code(lambda: tokenize(bad_text, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_message_is_resource_exhausted(real, channel):
    stub = pbg.GenerationStub(channel)
    code, _ = _code(lambda: stub.GenerateUnary(
        pb.GenerateRequest(text="x" * (harness.MAX_MESSAGE_BYTES + 10)), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = _code(lambda: stub.Detokenize(pb.DetokenizeRequest(token_ids=[600]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture()
def spy(real, monkeypatch):
    """Record what the server asks of the engine: prompts submitted, cancels, finish reasons."""
    engine = real.engine
    submit, cancel = engine.submit, engine.cancel
    seen = {"ids": {}, "cancel": [], "finish": {}}

    def spy_submit(req, on_output):
        seen["ids"][tuple(req.prompt_ids)] = req.request_id

        def out(o):
            if o.finish_reason:
                seen["finish"].setdefault(o.request_id, []).append(o.finish_reason)
            on_output(o)

        submit(req, out)

    def spy_cancel(request_id, reason="cancelled"):
        seen["cancel"].append((request_id, reason))
        cancel(request_id, reason)

    monkeypatch.setattr(engine, "submit", spy_submit)
    monkeypatch.setattr(engine, "cancel", spy_cancel)
    return seen


def _idle(real) -> None:
    """Wait until earlier tests' cancelled requests have left the engine."""
    _wait_for(lambda: (real.pages_used() == 0 and real.engine.stats()["queued"] == 0
                       and real.engine.stats()["running"] == 0), what="idle engine")


FILLER = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[11]),
                            sampling=pb.SamplingParams(max_tokens=harness.MAX_SEQ_LEN - 8,
                                                       ignore_eos=True))


def _fillers(real, stub, n: int) -> list:
    """n streams long enough (hundreds of steps) to keep the decode batch busy while a test
    runs; returns once min(n, decode slots) of them run."""
    _idle(real)
    calls = [stub.Generate(FILLER, timeout=120) for _ in range(n)]
    slots = real.engine.info()["limits"]["max_running"]
    _wait_for(lambda: real.engine.stats()["running"] >= min(n, slots), what="fillers running")
    return calls


def test_cancel_mid_stream_frees_pages(real, channel, spy):
    stub = pbg.GenerationStub(channel)
    fillers = _fillers(real, stub, 24)
    prompt = [1, 2, 3]
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                            sampling=pb.SamplingParams(max_tokens=120,
                                                                       ignore_eos=True)),
                         timeout=60)
    next(call)
    call.cancel()
    rid = _wait_for(lambda: spy["ids"].get(tuple(prompt)), what="submission")
    _wait_for(lambda: (rid, "cancelled") in spy["cancel"], what="engine.cancel")
    # the engine ends the unfinished request with "cancelled" (it ignores finished ones)
    _wait_for(lambda: spy["finish"].get(rid) == ["cancelled"], what="cancelled output")
    for f in fillers:
        f.cancel()
    _wait_for(lambda: real.pages_used() == 0, what="pages freed after cancel")
    ok = stub.GenerateUnary(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[4]),
                                               sampling=pb.SamplingParams(max_tokens=3)),
                            timeout=30)
    assert len(ok.completions[0].token_ids) >= 1  # and the server still serves


def test_deadline_exceeded_frees_pages(real, channel, spy):
    stub = pbg.GenerationStub(channel)
    fillers = _fillers(real, stub, 32)  # every decode slot is busy: the request below waits
    prompt = [7, 8]
    t0 = time.monotonic()
    code, _ = _code(lambda: list(stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=120,
                                                                      ignore_eos=True)),
        timeout=0.3)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
    rid = _wait_for(lambda: spy["ids"].get(tuple(prompt)), what="submission")
    # the server cancelled it as "deadline", or the engine dropped it at its deadline
    _wait_for(lambda: (rid, "deadline") in spy["cancel"]
              or "deadline" in spy["finish"].get(rid, []), what="deadline in the engine")
    for f in fillers:
        f.cancel()
    _wait_for(lambda: real.pages_used() == 0, what="pages freed")


def test_queue_full_is_resource_exhausted_on_the_real_engine(real, channel):
    stub = pbg.GenerationStub(channel)
    slots = real.engine.info()["limits"]["max_running"]
    calls = _fillers(real, stub, slots)  # every decode slot busy for hundreds of steps
    try:
        # Queue requests until one is refused: they are admitted far slower than sent.
        refused = []
        for _ in range(harness.MAX_QUEUE + 64):
            calls.append(stub.GenerateUnary.future(FILLER, timeout=120))
            refused = [c for c in calls[slots:] if c.done()]
            if refused:
                break
        if not refused:
            refused = [_wait_for(lambda: next((c for c in calls[slots:] if c.done()), None),
                                 timeout=10, what="a refused request")]
        err = refused[0].exception()
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "queue full" in err.details()
        assert real.engine.stats()["queued"] == harness.MAX_QUEUE
    finally:
        for c in calls:
            c.cancel()
    _idle(real)


def _gauge(real, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", real.metrics.render().decode(), re.MULTILINE)
    return float(m.group(1))


def test_waiting_gauge_counts_each_waiting_request_once(real, channel):
    """num_requests_waiting is the cores' queues plus what is still on the wire: a request
    waiting in a core's scheduler is not counted again as 'no output yet' by the front."""
    stub = pbg.GenerationStub(channel)
    slots = real.engine.info()["limits"]["max_running"]
    calls = _fillers(real, stub, slots)
    try:
        calls += [stub.GenerateUnary.future(FILLER, timeout=120) for _ in range(10)]
        _wait_for(lambda: real.engine.stats()["queued"] == 10, what="10 queued")
        _wait_for(lambda: (_gauge(real, "jaxinfer_num_requests_waiting") == 10
                           and _gauge(real, "jaxinfer_num_requests_running") == slots),
                  timeout=10, what="waiting gauge 10 with every slot running")
    finally:
        for c in calls:
            c.cancel()
    _idle(real)
    _wait_for(lambda: _gauge(real, "jaxinfer_num_requests_waiting") == 0, what="waiting 0")


def test_reflection_lists_services(real, channel):
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    db = ProtoReflectionDescriptorDatabase(channel)
    assert set(db.get_services()) >= {"jaxinfer.v1.Generation", "jetstream_proto.Orchestrator",
                                      "grpc.health.v1.Health",
                                      "grpc.reflection.v1alpha.ServerReflection"}
    pool = descriptor_pool.DescriptorPool(db)
    methods = {m.name for m in pool.FindServiceByName("jaxinfer.v1.Generation").methods}
    assert methods == {"Generate", "GenerateUnary", "Tokenize", "Detokenize", "ServerInfo"}
    decode = pool.FindServiceByName("jetstream_proto.Orchestrator").methods_by_name["Decode"]
    assert decode.server_streaming


def test_health_serving(real, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "jaxinfer.v1.Generation", "jetstream_proto.Orchestrator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name),
                            timeout=5).status == SERVING
    code, _ = _code(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_metrics_endpoint(real, channel):
    from serve.metrics import MetricsHttpServer

    pbg.GenerationStub(channel).GenerateUnary(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[9, 9]), sampling=pb.SamplingParams(max_tokens=4)), timeout=30)
    http = MetricsHttpServer(real.metrics, host="127.0.0.1", port=0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics",
                                      timeout=10).read().decode()
    finally:
        http.close()
    for name in ("jaxinfer_time_to_first_token_seconds_count",
                 "jaxinfer_inter_token_latency_seconds_count",
                 "jaxinfer_e2e_request_latency_seconds_count", "jaxinfer_num_requests_waiting",
                 "jaxinfer_num_requests_running", "jaxinfer_batch_occupancy",
                 "jaxinfer_kv_pages_used", "jaxinfer_kv_pages_free",
                 "jaxinfer_prefix_cache_hit_rate", "jaxinfer_preemptions_total",
                 "jaxinfer_recompiles_total", "jaxinfer_requests_total",
                 "jaxinfer_step_host_seconds_sum", "jaxinfer_step_schedule_seconds_sum"):
        assert re.search(rf"^{name}", body, re.MULTILINE), name
    samples = dict(re.findall(r"^(\w+(?:\{[^}]*\})?) (\S+)$", body, re.MULTILINE))
    assert float(samples["jaxinfer_time_to_first_token_seconds_count"]) >= 1
    assert float(samples["jaxinfer_inter_token_latency_seconds_count"]) >= 3
    assert float(samples["jaxinfer_e2e_request_latency_seconds_count"]) >= 1
    assert float(samples['jaxinfer_requests_total{code="OK",method="GenerateUnary"}']) >= 1
    assert float(samples["jaxinfer_kv_pages_free"]) > 0
    assert float(samples["jaxinfer_recompiles_total"]) == 0
    steps = float(samples["jaxinfer_step_host_seconds_count"])
    assert steps >= 4 and float(samples["jaxinfer_step_schedule_seconds_count"]) == steps
    assert 0 < float(samples["jaxinfer_step_schedule_seconds_sum"]) \
        <= float(samples["jaxinfer_step_host_seconds_sum"])


def test_zero_recompiles_after_warm_up(real, channel):
    """Every shape a request can lead to was compiled at warm-up (and the tests above ran)."""
    stub = pbg.GenerationStub(channel)
    S = pb.SamplingParams
    varied = [
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), sampling=S(max_tokens=1)),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(70))), sampling=S(max_tokens=50)),
        pb.GenerateRequest(text="abc", sampling=S(max_tokens=5, n=3, logprobs=5, seed=1,
                                                   temperature=0.8, top_k=5, top_p=0.9,
                                                   min_p=0.05, repetition_penalty=1.2,
                                                   presence_penalty=0.5,
                                                   frequency_penalty=0.5, stop=["zz"])),
    ]
    for req in varied:
        resp = stub.GenerateUnary(req, timeout=60)
        assert all(c.token_ids for c in resp.completions)
    assert real.engine.num_recompiles == 0


# -- python -m serve: SIGTERM drain, health transitions --------------------------------------
