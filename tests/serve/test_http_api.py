"""The OpenAI HTTP API (serve/http_server.py) through the official `openai` client, on one
server per module: the bundled demo model (trained, always present) on the real engine, with
HTTP and gRPC on one loop (tests/serve/server_harness.py), and a small Llama-3-style chat
template given as `--chat-template` would give it (the demo model ships none)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from jaxinfer.chat_template import ChatTemplate  # noqa: E402

MODEL = "demo-model"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}")
MAX_QUEUE = 128


class Http:
    def __init__(self, bg, front, engine, metrics, loaded, engine_cfg, mesh) -> None:
        self.bg, self.front, self.engine, self.metrics = bg, front, engine, metrics
        self.loaded, self.engine_cfg, self.mesh = loaded, engine_cfg, mesh
        self.base = f"http://127.0.0.1:{front.port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0,
                                    timeout=120)
        self.early: dict = {}

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name: str) -> float:
        body = self.get("/metrics")[1].decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


@pytest.fixture(scope="module")
def http():
    import jax

    from jaxinfer.config import EngineConfig, ServeConfig
    from jaxinfer.engine.core import EngineCore
    from jaxinfer.model_loader import load_model
    from serve.engine_client import EngineClient
    from serve.http_server import HttpFront
    from serve.metrics import PrometheusMetrics
    from sharding.mesh import make_mesh
    from tests.serve.server_harness import BackgroundServer

    mesh = make_mesh("dp=1,pp=1,tp=1", devices=jax.devices()[:1])
    loaded = load_model("demo", mesh=mesh, dtype="float32", seed=0)
    # One bucket of each kind: warm-up compiles are what this module costs.
    cfg = EngineConfig(page_size=16, num_pages=128, max_seq_len=512, dtype="float32",
                       batch_buckets=(16,), prefill_buckets=(32,), prefill_rows=(1,),
                       max_num_batched_tokens=64, decode_steps=4, max_n=4, max_logprobs=5)
    metrics = PrometheusMetrics()
    engine = EngineClient.in_process([EngineCore.create(loaded, cfg, mesh=mesh)],
                                     tokenizer=loaded.tokenizer, max_queue=MAX_QUEUE,
                                     metrics=metrics)
    bg = BackgroundServer(engine, ServeConfig(port=0, max_queue=MAX_QUEUE), metrics=metrics,
                          warm=False)
    template = ChatTemplate(TEMPLATE, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    front = HttpFront(bg.server, host="127.0.0.1", port=0, served_model_names=[MODEL],
                      chat_template=template, metrics=metrics)
    bg.call(front.start())
    h = Http(bg, front, engine, metrics, loaded, cfg, mesh)
    # during warm-up: /health and generation answer 503
    h.early["health"] = h.get("/health")[0]
    h.early["completion"] = h.post("/v1/completions", {"model": MODEL, "prompt": "x"})
    bg.warm_up()
    yield h
    try:
        bg.call(front.stop(), timeout=30)
    finally:
        bg.close()


def _greedy(**kw):
    return dict(model=MODEL, temperature=0, **kw)


def test_warm_up_answers_503_then_serves(http):
    assert http.early["health"] == 503
    status, body = http.early["completion"]
    assert status == 503 and "warming up" in body["error"]["message"]
    assert http.get("/health")[0] == 200
    models = http.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_greedy_completion_equals_offline_generation(http):
    from jaxinfer.engine.llm import LLM

    tok = http.loaded.tokenizer
    prompts = ["def parse_args(", "import os\nimport"]
    r = http.client.completions.create(**_greedy(prompt=prompts, max_tokens=12))
    llm = LLM.from_loaded(http.loaded, http.engine_cfg, mesh=http.mesh)
    ids = [tok.encode(p) for p in prompts]
    want = [c[0] for c in llm.generate([llm.request(p, max_tokens=12) for p in ids])]
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(len(p) for p in ids)
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streamed: the same text, ending with a usage chunk and [DONE] (the client checks it)
    chunks = list(http.client.completions.create(**_greedy(
        prompt=prompts[0], max_tokens=12, stream=True,
        stream_options={"include_usage": True})))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        len(want[0].token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        want[0].finish_reason
    # token-id prompts are used as given; echo puts the prompt text first
    r2 = http.client.completions.create(**_greedy(prompt=ids[0], max_tokens=12, echo=True))
    assert r2.choices[0].text == tok.decode(ids[0]) + want[0].text


def test_chat_streamed_and_not(http):
    tok = http.loaded.tokenizer
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "def main():"}]
    r = http.client.chat.completions.create(**_greedy(messages=messages, max_tokens=8))
    text = ChatTemplate(TEMPLATE, special_tokens={"bos_token": "<s>"}).render(messages)
    assert r.usage.prompt_tokens == len(tok.encode(text, add_bos=False))
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == MODEL
    chunks = list(http.client.chat.completions.create(**_greedy(
        messages=messages, max_completion_tokens=8, stream=True,
        stream_options={"include_usage": True})))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_seeds_n_and_logprobs(http):
    kw = dict(model=MODEL, prompt="class Parser:", max_tokens=8, temperature=1.0,
              extra_body={"top_k": 50, "ignore_eos": True})
    a = http.client.completions.create(seed=123, n=3, **kw)
    b = http.client.completions.create(seed=123, n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the samples of n differ
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == 3 * 8  # over all samples
    r = http.client.completions.create(**_greedy(prompt="import", max_tokens=4, logprobs=3))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 3 and max(t.values()) <= 0 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(v - max(t.values())) < 1e-5 for v, t in zip(lp.token_logprobs,
                                                                lp.top_logprobs))
    assert "".join(lp.tokens) == r.choices[0].text
    c = http.client.chat.completions.create(**_greedy(
        messages=[{"role": "user", "content": "x"}], max_tokens=4, logprobs=True,
        top_logprobs=2))
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_errors_in_openai_shape(http):
    c = http.client
    cases = [
        (dict(temperature=-1), 400, "temperature"),
        (dict(top_p=1.5), 400, "top_p"),
        (dict(max_tokens=0), 400, "max_tokens"),
        (dict(n=99), 400, "n"),
        (dict(logprobs=99), 400, "logprobs"),
        (dict(extra_body={"top_k": -5}), 400, "top_k"),
        (dict(extra_body={"repetition_penalty": 0}), 400, "repetition_penalty"),
        (dict(max_tokens="many"), 400, "max_tokens"),  # a pydantic error, as OpenAI's 400
        (dict(prompt=[]), 400, "prompt"),
        (dict(prompt=[10**9]), 400, "prompt"),
        (dict(model="no-such-model"), 404, "model"),
    ]
    for kw, status, param in cases:
        args = {"model": MODEL, "prompt": "x", "max_tokens": 4, **kw}
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(**args)
        err = e.value.body
        assert e.value.status_code == status, (kw, err)
        assert err["param"] == param and err["message"] and err["type"], (kw, err)
    status, body = http.post("/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = http.post("/v1/chat/completions", {"model": MODEL})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = http.post("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function"}]})
    assert status == 400 and body["error"]["param"] == "tools"
    assert http.get("/v1/nothing-here")[0] == 404
    # a full queue: 429 (what a tiny --max-queue gives; 0 admits nothing)
    http.engine.max_queue = 0
    try:
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert "queue full" in e.value.body["message"]
    finally:
        http.engine.max_queue = MAX_QUEUE


def test_chat_without_template_is_a_400(http):
    template, http.front.chat_template = http.front.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError) as e:
            http.client.chat.completions.create(model=MODEL, max_tokens=2,
                                                messages=[{"role": "user", "content": "x"}])
        assert "no chat template" in e.value.body["message"]
    finally:
        http.front.chat_template = template


def test_100_concurrent_streams_complete(http):
    import asyncio

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=http.base + "/v1", api_key="none", max_retries=0,
                                    timeout=120)

        async def one(i: int) -> tuple[str, int]:
            stream = await client.completions.create(
                model=MODEL, prompt=f"x{i} =", max_tokens=3, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [c async for c in stream]
            return chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens

        async with client:
            return await asyncio.gather(*(one(i) for i in range(100)))

    assert asyncio.run(run()) == [("length", 3)] * 100


def _wait_pages_free(http, timeout: float = 30.0) -> float:
    end = time.monotonic() + timeout
    while True:
        used = http.metric("jaxinfer_kv_pages_used")
        if used == 0 or time.monotonic() > end:
            return used
        time.sleep(0.05)


def test_disconnect_cancels_and_frees_pages(http):
    assert _wait_pages_free(http) == 0
    generated = http.metric("jaxinfer_generation_tokens_total")
    cancelled = http.metric('jaxinfer_request_finished_total{finish_reason="cancelled"}') \
        if 'finish_reason="cancelled"' in http.get("/metrics")[1].decode() else 0.0
    long = dict(model=MODEL, prompt="def f():", max_tokens=480, temperature=0,
                extra_body={"ignore_eos": True})
    # streaming: read one chunk, then hang up
    stream = http.client.completions.create(stream=True, **long)
    next(iter(stream))
    assert http.metric("jaxinfer_kv_pages_used") > 0
    stream.close()
    assert _wait_pages_free(http) == 0
    # not streaming: the client gives up (times out) while it runs
    short = openai.OpenAI(base_url=http.base + "/v1", api_key="none", max_retries=0,
                          timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        short.completions.create(**long)
    assert _wait_pages_free(http) == 0
    # both were cut short, not run to the end
    assert http.metric("jaxinfer_generation_tokens_total") - generated < 2 * 480
    assert http.metric('jaxinfer_request_finished_total{finish_reason="cancelled"}') \
        == cancelled + 2


def test_metrics_and_drain(http):
    body = http.get("/metrics")[1].decode()
    for name in ("jaxinfer_prompt_tokens_total", "jaxinfer_generation_tokens_total",
                 'jaxinfer_request_finished_total{finish_reason="length"}',
                 "jaxinfer_request_queue_time_seconds_count",
                 "jaxinfer_request_prefill_time_seconds_count",
                 "jaxinfer_request_decode_time_seconds_count",
                 'jaxinfer_requests_total{code="200",method="HTTP /v1/completions"}',
                 'jaxinfer_requests_total{code="400",method="HTTP /v1/completions"}',
                 "jaxinfer_prefix_cache_queried_tokens_total"):
        m = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
        assert m and float(m.group(1)) > 0, name
    # drain (what SIGTERM does): the open stream finishes, new requests and /health get 503
    stream = iter(http.client.completions.create(
        model=MODEL, prompt="x", max_tokens=40, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    first = next(stream)
    http.bg.server.request_shutdown_state()
    assert http.get("/health")[0] == 503
    with pytest.raises(openai.APIStatusError) as e:
        http.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert e.value.status_code == 503 and "draining" in e.value.body["message"]
    drained = concurrent.futures.ThreadPoolExecutor(1).submit(http.bg.drain, 60)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"
    tokens = first.choices[0].text + "".join(c.choices[0].text for c in rest)
    assert tokens
    assert drained.result(60) is True


def test_vllm_flag_names_map_onto_ours(tmp_path):
    from jaxinfer.errors import ConfigError
    from serve.__main__ import _http_settings, build_parser, engine_config, resolve_mesh

    def parse(*argv):
        return build_parser().parse_args(["--model", "demo", *argv])

    args = parse("--max-model-len", "1024", "--max-num-seqs", "48", "--tensor-parallel-size",
                 "2", "--quant", "int8")
    cfg = engine_config(args, default_dtype="float32")
    assert cfg.max_seq_len == 1024 and cfg.batch_buckets == (16, 32, 48)
    assert resolve_mesh(args) == "dp=1,pp=1,tp=2" and args.quant == "int8"
    assert resolve_mesh(parse("--mesh", "dp=2,tp=2", "--tensor-parallel-size", "2")) == \
        "dp=2,pp=1,tp=2"
    for argv, match in ((("--max-model-len", "64", "--max-seq-len", "128"), "disagree"),
                        (("--max-num-seqs", "8", "--batch-buckets", "4,16"), "disagree")):
        with pytest.raises(ConfigError, match=match):
            engine_config(parse(*argv), default_dtype="float32")
    with pytest.raises(ConfigError, match="disagree"):
        resolve_mesh(parse("--mesh", "tp=4", "--tensor-parallel-size", "2"))
    # HTTP: on by default at 8000 on --host, named after --model; 0 turns it off
    http = _http_settings(parse("--host", "0.0.0.0"))
    assert (http["host"], http["port"], http["served_model_names"]) == ("0.0.0.0", 8000,
                                                                         ["demo"])
    assert http["chat_template"] is None  # the demo model has none
    assert _http_settings(parse("--http-port", "0")) is None
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    http = _http_settings(parse("--served-model-name", "a", "b", "--chat-template",
                                str(template), "--http-host", "::1"))
    assert http["served_model_names"] == ["a", "b"] and http["host"] == "::1"
    assert http["chat_template"].source == TEMPLATE
    with pytest.raises(ConfigError, match="--chat-template"):
        _http_settings(parse("--chat-template", str(tmp_path / "missing.jinja")))


def test_http_port_in_use_is_one_line_exit_1():
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "serve", "--model", "dummy", "--port", "0",
                            "--http-port", str(port)], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == \
        f"serve: error: cannot listen for HTTP on 127.0.0.1:{port}: Address already in use"


def test_client_that_stops_reading_is_cancelled_after_stream_timeout():
    """A streaming client that reads nothing fills the socket; uvicorn's write then waits, and
    after --stream-timeout the response is cancelled (every request of it, pages freed, a log
    line, a metric) and the connection dropped, while another client is served as usual. On
    the hand-computable stub engine, whose fast output fills the socket in about a second."""
    import socket

    from jaxinfer.config import ServeConfig
    from serve.http_server import HttpFront
    from serve.metrics import PrometheusMetrics
    from tests.serve.server_harness import BackgroundServer
    from tests.serve.stub_engine import StubEngine, expected_tokens

    engine = StubEngine(tick=0.002, max_tokens=4000, max_seq_len=4096, num_pages=16384,
                        max_running=64, max_queue=64)
    metrics = PrometheusMetrics()
    bg = BackgroundServer(engine, ServeConfig(port=0, stream_timeout=1.0), metrics=metrics)
    front = HttpFront(bg.server, host="127.0.0.1", port=0, served_model_names=["stub"],
                      metrics=metrics)
    bg.call(front.start())
    h = Http(bg, front, engine, metrics, None, None, None)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: stays small
    try:
        sock.connect(("127.0.0.1", front.port))
        body = json.dumps({"model": "stub", "prompt": [[i] for i in range(16)], "n": 4,
                           "logprobs": 5, "max_tokens": 4000, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait_for(lambda: engine.stats()["running"] == 16, "the stalled requests running")
        status, ok = h.post("/v1/completions", {"model": "stub", "prompt": [2],
                                                "max_tokens": 50})
        assert status == 200 and ok["choices"][0]["text"] == bytes(
            expected_tokens([2], 50)).decode()
        _wait_for(lambda: len(engine.cancelled) == 16, "the stalled stream cancelled", 30)
        assert {r for _, r in engine.cancelled} == {"cancelled"}
        _wait_for(lambda: engine.stats()["pages_used"] == 0, "pages freed")
        # uvicorn forgets the connection (its buffered bytes go with it)
        _wait_for(lambda: not front._uvicorn.server_state.connections, "connection dropped")
        assert 'jaxinfer_stalled_streams_total{front="HTTP /v1/completions"} 1.0' in \
            metrics.render().decode()
        assert h.get("/health")[0] == 200
    finally:
        sock.close()
        try:
            bg.call(front.stop(), timeout=30)
        finally:
            bg.close()


def _wait_for(pred, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
