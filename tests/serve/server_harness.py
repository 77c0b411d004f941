"""Run a `serve.server.Server` on its own event-loop thread inside the test process, so tests
can call it with ordinary blocking gRPC stubs; and build the one real-engine server that the
server and JetStream tests share (the dummy model with small buckets: warm-up is what costs)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from jaxinfer.config import ServeConfig
from serve.server import Server

REPO = Path(__file__).resolve().parents[2]

# Small enough to warm up fast on two CPU cores, large enough for 200 concurrent streams (most
# of them wait in the queue), and for requests long enough (up to MAX_SEQ_LEN tokens, every
# decode slot full: 32 x 32 pages) that tests can hold the batch busy for seconds.
MAX_SEQ_LEN = 512
MAX_QUEUE = 256
MAX_MESSAGE_BYTES = 256 * 1024


class BackgroundServer:
    """A Server started (and by default warmed) on 127.0.0.1:<free port> from a loop thread."""

    def __init__(self, engine, cfg: ServeConfig | None = None, *, metrics=None,
                 warm: bool = True) -> None:
        self.engine = engine
        self.metrics = metrics
        self.cfg = cfg or ServeConfig(port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="test-grpc-loop")
        self._thread.start()
        self.server = Server(engine, self.cfg, metrics=metrics)
        self.port = self.call(self.server.start())
        if warm:
            self.warm_up()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def warm_up(self) -> None:
        self.call(self.server.warm_up(progress=False))

    def call(self, coro, timeout: float | None = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def drain(self, timeout: float = 30.0) -> bool:
        return self.call(self.server.drain(timeout))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace=0), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


@dataclasses.dataclass
class RealServer:
    """The shared server over the real engine, plus what tests compare it with."""

    bg: BackgroundServer
    engine: object
    metrics: object
    tokenizer: object
    offline: Callable[[list[list[int]], int], list[list[int]]]  # greedy offline (LLM) tokens
    pages_used: Callable[[], int]
    http_port: int | None = None  # its OpenAI HTTP front, once `shared_http_front` started it


HTTP_MODEL = "shared-model"  # the name the shared server's HTTP front serves
# A minimal chat template (the dummy model has none), so chat requests reach the engine.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


_shared: list[RealServer] = []


def shared_real_server(config) -> RealServer:
    """Build (once per pytest session) the dummy-model server on the real engine; `config`
    (pytest's) closes it when the session ends."""
    if _shared:
        return _shared[0]
    import jax

    from jaxinfer.config import EngineConfig
    from jaxinfer.engine.core import EngineCore
    from jaxinfer.engine.llm import LLM
    from jaxinfer.model_loader import load_model
    from serve.engine_client import EngineClient
    from serve.metrics import PrometheusMetrics
    from sharding.mesh import make_mesh

    mesh = make_mesh("dp=1,pp=1,tp=1", devices=jax.devices()[:1])
    loaded = load_model("dummy", mesh=mesh, dtype="float32", seed=0)
    engine_cfg = EngineConfig(page_size=16, num_pages=1024, max_seq_len=MAX_SEQ_LEN,
                              dtype="float32", batch_buckets=(8, 32), prefill_buckets=(32,),
                              prefill_rows=(1, 4), max_num_batched_tokens=128, decode_steps=4,
                              max_n=4, max_logprobs=5)
    metrics = PrometheusMetrics()
    engine = EngineClient.in_process([EngineCore.create(loaded, engine_cfg, mesh=mesh)],
                                     tokenizer=loaded.tokenizer, max_queue=MAX_QUEUE,
                                     metrics=metrics)
    cfg = ServeConfig(port=0, max_queue=MAX_QUEUE, max_message_bytes=MAX_MESSAGE_BYTES)
    bg = BackgroundServer(engine, cfg, metrics=metrics)
    generator = LLM.from_loaded(loaded, engine_cfg, mesh=mesh)  # the same programs, offline

    def offline(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        reqs = [generator.request(p, max_tokens=max_tokens) for p in prompts]
        return [c[0].token_ids for c in generator.generate(reqs)]

    def pages_used() -> int:
        return int(engine.stats()["pages_used"])

    real = RealServer(bg, engine, metrics, loaded.tokenizer, offline, pages_used)
    _shared.append(real)
    config.add_cleanup(bg.close)
    return real


def shared_http_front(config) -> RealServer:
    """`shared_real_server` with the OpenAI HTTP front started on it too (once per session:
    the fuzz and soak tests share it); its port is `RealServer.http_port`."""
    real = shared_real_server(config)
    if real.http_port is None:
        from jaxinfer.chat_template import ChatTemplate
        from serve.http_server import HttpFront

        front = HttpFront(real.bg.server, host="127.0.0.1", port=0,
                          served_model_names=[HTTP_MODEL],
                          chat_template=ChatTemplate(CHAT_TEMPLATE, special_tokens={}),
                          metrics=real.metrics)
        real.http_port = real.bg.call(front.start())
        # cleanups run last-added first: the front stops before the server closes
        config.add_cleanup(lambda: real.bg.call(front.stop(), timeout=30))
    return real

def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    """Poll `pred` until it holds; the bound is generous (it returns as soon as it holds), so
    a loaded CI machine does not fail a test that is merely slow."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def status_code(call_fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call_fn()
    return info.value.code(), info.value.details()


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env
