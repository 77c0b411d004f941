"""Property-based tests (hypothesis) of request handling on both fronts: whatever a client
sends (random field values, types, sizes, raw bytes, encodings), the server answers with a
documented status, never an internal error (gRPC INTERNAL or UNKNOWN, HTTP 5xx), never hangs,
and never changes what other clients get.

Cost: one server for the whole session (the dummy model on the real engine that
`tests/serve/test_server.py` shares, `server_harness.shared_http_front` with its HTTP front); example counts are small and fixed (`derandomize`: the CI gate runs the same
examples every time; `JAXINFER_FUZZ_EXAMPLES=N` hunts with N random ones) and generation
lengths are kept short, since accepted requests run.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request

import grpc
import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from serve.protos import jaxinfer_v1_pb2 as pb  # noqa: E402
from serve.protos import jaxinfer_v1_pb2_grpc as pbg  # noqa: E402
from serve.protos import jetstream_pb2 as js  # noqa: E402
from tests.serve import server_harness as harness  # noqa: E402

MODEL = harness.HTTP_MODEL
# Statuses a request may end with; anything else (INTERNAL, UNKNOWN, ...) is a bug.
GRPC_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED}
HTTP_STATUSES = {200, 400, 404, 429}
CALL_TIMEOUT = 30.0  # a hang fails the example (DEADLINE_EXCEEDED at the client is not OK)
# The gate runs the same 60 examples per test each time; JAXINFER_FUZZ_EXAMPLES=N runs N new
# random ones (a longer hunt, e.g. 2000: about a minute per test).
_HUNT = os.environ.get("JAXINFER_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_HUNT or 60), deadline=None, derandomize=not _HUNT,
                database=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])

# A well-behaved client's request, run beside the fuzzing: its answer must never change.
REFERENCE_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
REFERENCE_TOKENS = 8


class Fronts:
    def __init__(self, real, http_port: int) -> None:
        self.real = real
        self.base = f"http://127.0.0.1:{http_port}"
        self.channel = real.bg.channel()
        self.stub = pbg.GenerationStub(self.channel)
        self.want = real.offline([REFERENCE_PROMPT], REFERENCE_TOKENS)[0]

    def reference_tokens(self) -> list[int]:
        resp = self.stub.GenerateUnary(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=REFERENCE_PROMPT),
            sampling=pb.SamplingParams(max_tokens=REFERENCE_TOKENS)), timeout=CALL_TIMEOUT)
        return list(resp.completions[0].token_ids)

    def post(self, path: str, data: bytes, content_type: str = "application/json"
             ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=CALL_TIMEOUT) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture(scope="module")
def fronts(request):
    real = harness.shared_http_front(request.config)
    f = Fronts(real, real.http_port)
    yield f
    f.channel.close()


@pytest.fixture()
def bystander(fronts):
    """A client sending the reference request over and over while a test fuzzes; the test's
    end checks that every answer was the offline one and the engine went idle."""
    stop = threading.Event()
    answers: list = []

    def run() -> None:
        while not stop.is_set():
            try:
                answers.append(fronts.reference_tokens())
            except grpc.RpcError as e:  # recorded: a refusal or failure is a changed answer
                answers.append((e.code(), e.details()))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(CALL_TIMEOUT)
    assert answers and all(a == fronts.want for a in answers), answers[:3]
    _wait_idle(fronts.real)


def _wait_idle(real) -> None:
    import time

    end = time.monotonic() + 60
    while time.monotonic() < end:
        s = real.engine.stats()
        if s["pages_used"] == 0 and s["running"] == 0 and s["queued"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {real.engine.stats()}")


# -- gRPC ----------------------------------------------------------------------------------

int32 = st.integers(-2**31, 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
# Floats as a client may send them (a proto float field takes nan, inf, huge and tiny values).
any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
# Mostly short: accepted requests generate, and the gate must stay fast.
max_tokens = st.one_of(st.integers(0, 6), st.sampled_from([512, 100000, 2**32 - 1]))
token_ids = st.lists(st.one_of(st.integers(0, 600), int32), max_size=40)
texts = st.text(max_size=60)  # any code point but lone surrogates (protobuf needs UTF-8)


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    p = pb.SamplingParams(max_tokens=draw(max_tokens))
    for field, strategy in (("temperature", any_float), ("top_k", int32), ("min_p", any_float),
                            ("ignore_eos", st.booleans()), ("presence_penalty", any_float),
                            ("frequency_penalty", any_float), ("n", st.integers(0, 8)),
                            ("top_p", any_float), ("repetition_penalty", any_float),
                            ("seed", st.integers(0, 2**64 - 1)),
                            ("logprobs", st.integers(0, 40))):
        if draw(st.booleans()):
            setattr(p, field, draw(strategy))
    p.stop.extend(draw(st.lists(texts, max_size=20)))
    p.stop_token_ids.extend(draw(st.lists(int32, max_size=20)))
    return p


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=draw(texts), priority=draw(int32),
                             sampling=draw(sampling_params()))
    prompt = draw(st.sampled_from(["text", "ids", "none", "big"]))
    if prompt == "text":
        req.text = draw(texts)
    elif prompt == "ids":
        req.token_ids.ids.extend(draw(token_ids))
    elif prompt == "big":  # near and past --max-message-bytes
        req.text = "x" * draw(st.sampled_from([600, harness.MAX_MESSAGE_BYTES - 64,
                                               harness.MAX_MESSAGE_BYTES + 1]))
    if draw(st.booleans()):
        req.add_bos = draw(st.booleans())
    return req


def _code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _check_grpc(code: grpc.StatusCode, details: str, what) -> None:
    assert code in GRPC_CODES, (code, details, what)


@FUZZ
@given(req=generate_requests(), streamed=st.booleans())
def test_fuzzed_generate_requests(fronts, bystander, req, streamed):
    stub = fronts.stub
    if streamed:
        code, details = _code_of(lambda: list(stub.Generate(req, timeout=CALL_TIMEOUT)))
    else:
        code, details = _code_of(lambda: stub.GenerateUnary(req, timeout=CALL_TIMEOUT))
    _check_grpc(code, details, req)


@st.composite
def decode_requests(draw) -> js.DecodeRequest:
    req = js.DecodeRequest(max_tokens=draw(st.one_of(st.integers(-3, 6), int32)),
                           num_samples=draw(st.integers(-2, 8)), has_bos=draw(st.booleans()),
                           lora_adapter_id=draw(texts))
    if draw(st.booleans()):
        req.text_content.text = draw(texts)
    else:
        req.token_content.token_ids.extend(draw(token_ids))
    if draw(st.booleans()):
        req.metadata.start_time = draw(any_float)
    return req


@FUZZ
@given(req=decode_requests())
def test_fuzzed_jetstream_decode(fronts, bystander, req):
    from serve.protos import jetstream_pb2_grpc as jsg

    stub = jsg.OrchestratorStub(fronts.channel)
    code, details = _code_of(lambda: list(stub.Decode(req, timeout=CALL_TIMEOUT)))
    _check_grpc(code, details, req)


# Every method that takes a request, called with raw bytes instead of a message.
RAW_METHODS = ["/jaxinfer.v1.Generation/Generate", "/jaxinfer.v1.Generation/GenerateUnary",
               "/jaxinfer.v1.Generation/Tokenize", "/jaxinfer.v1.Generation/Detokenize",
               "/jaxinfer.v1.Generation/ServerInfo", "/jetstream_proto.Orchestrator/Decode",
               "/jetstream_proto.Orchestrator/HealthCheck"]
# A valid SamplingParams field appended to raw bytes: when they parse, protobuf merges it in,
# so an accepted request stays short.
_SHORT = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)).SerializeToString()


@FUZZ
@given(method=st.sampled_from(RAW_METHODS), data=st.binary(max_size=300),
       bounded=st.booleans())
def test_raw_bytes_never_give_internal_errors(fronts, bystander, method, data, bounded):
    payload = data + _SHORT if bounded else data
    streaming = method.endswith(("/Generate", "/Decode"))
    call = (fronts.channel.unary_stream if streaming else fronts.channel.unary_unary)(method)
    code, details = _code_of(lambda: list(call(payload, timeout=CALL_TIMEOUT)) if streaming
                             else call(payload, timeout=CALL_TIMEOUT))
    _check_grpc(code, details, (method, payload))


# -- HTTP ----------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(), texts)  # nan and inf go out as NaN / Infinity
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=8)
# Values near what each parameter takes, so that many bodies get past the type checks
PARAM_VALUES = {
    "model": st.one_of(st.just(MODEL), texts),
    "prompt": st.one_of(texts, st.lists(texts, max_size=3), token_ids,
                        st.lists(token_ids, max_size=3)),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", ""]),
         "content": st.one_of(texts, st.none(),
                              st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                              "text": texts}), max_size=2))}),
        max_size=3),
    "max_tokens": st.one_of(st.integers(-2, 6), st.sampled_from([10**6, 2**63])),
    "max_completion_tokens": st.integers(-2, 6),
    "temperature": st.floats(-5, 5), "top_p": st.floats(-1, 2), "n": st.integers(-1, 6),
    "stop": st.one_of(texts, st.lists(texts, max_size=20)), "seed": st.integers(-2**64, 2**64),
    "logprobs": st.one_of(st.booleans(), st.integers(-2, 30)), "top_logprobs": st.integers(-2, 30),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "echo": st.booleans(), "top_k": st.integers(-3, 600), "min_p": st.floats(-1, 2),
    "repetition_penalty": st.floats(-1, 3), "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(-5, 2**40), max_size=5),
    "stream": st.booleans(), "stream_options": st.one_of(
        st.fixed_dictionaries({"include_usage": st.booleans()}), json_value),
    "best_of": st.integers(-1, 6), "logit_bias": json_value, "suffix": texts,
    "tools": json_value, "response_format": json_value, "add_generation_prompt": st.booleans(),
    "chat_template_kwargs": st.dictionaries(texts, json_value, max_size=3),
    "add_special_tokens": st.booleans(),
}


@st.composite
def bodies(draw) -> dict:
    body = {}
    for key in draw(st.lists(st.sampled_from(sorted(PARAM_VALUES)), unique=True, max_size=10)):
        # usually a plausible value, sometimes any JSON at all (wrong types)
        body[key] = draw(json_value if draw(st.integers(0, 4)) == 0 else PARAM_VALUES[key])
    if draw(st.booleans()):
        body.setdefault("model", MODEL)
    if draw(st.booleans()):  # keep most runs short whatever else was drawn
        body["max_tokens"] = draw(st.integers(1, 6))
    return body


def _check_http(status: int, payload: bytes, what) -> None:
    assert status in HTTP_STATUSES, (status, payload[:300], what)
    if status != 200:
        err = json.loads(payload)["error"]  # OpenAI's error shape, always
        assert err["message"] and err["type"], err
        return
    if payload.startswith(b"data: "):  # a stream: each event JSON, no internal error in it
        events = [e for e in payload.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            data = json.loads(event.removeprefix("data: "))
            assert data.get("error", {}).get("type") != "internal_error", data
    else:
        json.loads(payload)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies())
def test_fuzzed_http_bodies(fronts, bystander, path, body):
    if path.endswith("chat/completions") and "max_completion_tokens" not in body:
        body.setdefault("max_tokens", 4)  # chat's default is the whole context: too slow here
    data = json.dumps(body).encode()  # Python's JSON: NaN and Infinity literals too
    status, payload = fronts.post(path, data)
    _check_http(status, payload, body)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models",
                             "/health", "/nope"]),
       data=st.one_of(st.binary(max_size=200),
                      st.builds(lambda s, enc: s.encode(enc, errors="replace"),
                                st.text(max_size=100),
                                st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1",
                                                 "utf-8-sig"]))),
       content_type=st.sampled_from(["application/json", "text/plain", "",
                                     "application/json; charset=utf-16",
                                     "multipart/form-data; boundary=x"]))
def test_raw_http_bodies_never_give_5xx(fronts, bystander, path, data, content_type):
    status, payload = fronts.post(path, data, content_type)
    if path in ("/v1/models", "/health"):  # GET-only paths answer a POST 405
        assert status == 405, (status, payload[:200])
        return
    _check_http(status, payload, (path, data, content_type))


def test_fuzz_strategies_reach_the_engine(fronts):
    """The strategies above are not all refusals: some drawn request is accepted and generates
    (otherwise the fuzzing would only ever test validation)."""
    found = hypothesis.find(generate_requests(), lambda r: _accepted(fronts, r),
                            settings=settings(max_examples=200, database=None,
                                              derandomize=True, deadline=None))
    assert _accepted(fronts, found)


def _accepted(fronts, req) -> bool:
    code, _ = _code_of(lambda: fronts.stub.GenerateUnary(req, timeout=CALL_TIMEOUT))
    return code == grpc.StatusCode.OK
