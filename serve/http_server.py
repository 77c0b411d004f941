"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), beside gRPC on the same server and
engine.

Threads and loops: uvicorn runs as a task on the asyncio loop that also runs `grpc.aio` (one
thread); handlers convert a body (`serve/openai_api.py`), then submit through the gRPC
server's own `Server.open_stream`, so both protocols share one engine, one in-flight count,
one drain and one state (warm-up, serving, draining). The engine's output thread hands each
Output to that loop (`call_soon_threadsafe`), never touching HTTP itself.

    client ──HTTP──▶ uvicorn (asyncio loop): parse, validate, Server.open_stream(Request)
                     │   per-request stream ◀── engine output thread (call_soon_threadsafe)
                     ▼
                     JSON response, or server-sent events ending in `data: [DONE]`

A client that goes away cancels its requests at once, freeing their KV pages: a streaming
response is cancelled by Starlette when the connection reports `http.disconnect` (its generator's
`finally` closes the streams); a non-streaming one races its collection against the same
disconnect message. On SIGTERM `python -m serve` drains the `Server` (new requests get 503,
`/health` 503, in-flight ones finish), then stops uvicorn, which lets open responses send
their last bytes before it closes the connections.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad
value (naming the parameter; FastAPI's 422 for a body that does not parse is turned into this
400), 404 for an unknown model or path, 429 when the queue is full, 503 during warm-up and
drain, 500 for a request the engine failed. Once a stream has started (status 200), a failure
arrives as one `data: {"error": ...}` event before `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Sequence

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxinfer.chat_template import ChatTemplate
from jaxinfer.engine.request import Output, Request, Usage
from jaxinfer.errors import (CapacityError, ConfigError, JaxinferError, PreconditionError,
                             RequestError, UnavailableError)
from serve import openai_api as oa
from serve.api import model_name
from serve.server import RpcFailure, Server, StalledStream, State, Stream

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                500: "internal_error", 503: "service_unavailable", 504: "timeout_error"}
_FAILURE_STATUS = {grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAVAILABLE: 503}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _param_of(message: str) -> str | None:
    """The parameter a RequestError names: `validate_request` and the converters start every
    message with the field's (protocol-spelled) name."""
    head = message.split(" ", 1)[0].rstrip(":,")
    base = head.split("[", 1)[0].split(".", 1)[0]
    return base if base in oa.PARAM_NAMES else None


def api_error(exc: BaseException) -> ApiError:
    """The HTTP error for an exception from validation, submission or the engine."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (RequestError, PreconditionError)):
        return ApiError(400, str(exc), param=_param_of(str(exc)), code="invalid_value")
    if isinstance(exc, CapacityError):
        return ApiError(429, str(exc), code="queue_full")
    if isinstance(exc, UnavailableError):
        return ApiError(503, str(exc), code="unavailable")
    if isinstance(exc, RpcFailure):
        return ApiError(_FAILURE_STATUS.get(exc.code, 500), exc.details, code="request_failed")
    logger.exception("HTTP request failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_DONE = "data: [DONE]\n\n"


async def _merged(streams: Sequence[Stream]) -> AsyncIterator[tuple[int, list[Output]]]:
    """(stream index, batch) from several streams as their batches arrive."""
    if len(streams) == 1:
        async for batch in streams[0].batches():
            yield 0, batch
        return
    # Bounded: a pump waits while the reader is behind, so its stream's own buffer (merged per
    # sample) holds what the client has not taken, as it does for a single stream.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for batch in stream.batches():
                await queue.put((i, batch, None))
        except Exception as e:  # re-raised by the reader, which closes every stream
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, batch, error = await queue.get()
            if error is not None:
                raise error
            if batch is None:
                left -= 1
            else:
                yield i, batch
    finally:
        for t in tasks:
            t.cancel()


async def _until_disconnect(request: HttpRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# Scope key of a callable that drops the request's connection at once (see `_Counted`).
_ABORT_CONNECTION = "jaxinfer.abort_connection"


def _connection_aborter(send):
    """A callable that aborts the connection `send` writes to: uvicorn's `send` is a method of
    its protocol object, which holds the asyncio transport. ASGI has no message for it; a
    server other than uvicorn gets a no-op (its connection then closes when flushed)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    return abort if callable(abort) else (lambda: None)


class _Counted:
    """The outermost ASGI layer: counts finished HTTP requests by path and status in the
    server's `jaxinfer_requests_total` (a pure ASGI layer: Starlette's BaseHTTPMiddleware would
    get in the way of streaming and of disconnect detection), and puts `_ABORT_CONNECTION` in
    the scope for a stalled stream."""

    def __init__(self, app, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope[_ABORT_CONNECTION] = _connection_aborter(send)
        if scope["type"] != "http" or self.metrics is None:
            await self.app(scope, receive, send)
            return
        status = [0]

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            known = path in ("/v1/models", "/v1/completions", "/v1/chat/completions",
                             "/health", "/metrics")
            self.metrics.count_request(f"HTTP {path if known else 'other'}",
                                       str(status[0] or 499))


class HttpFront:
    """The HTTP API of `server` (see the module docstring).

    Args:
        server: the gRPC `Server` whose engine, state and limits are shared.
        host, port: where to listen (port 0: a free one; `start` returns it).
        served_model_names: the names `/v1/models` lists and requests must use.
        chat_template: the model's chat template (None: chat requests get a 400).
        metrics: the `PrometheusMetrics` whose registry `/metrics` serves.
    """

    def __init__(self, server: Server, *, host: str, port: int,
                 served_model_names: Sequence[str], chat_template: ChatTemplate | None = None,
                 metrics=None) -> None:
        if not served_model_names:
            raise ConfigError("--served-model-name: give at least one name")
        self.server = server
        self.host = host
        self.port = port
        self.names = list(served_model_names)
        self.chat_template = chat_template
        self.metrics = metrics
        self.app = self._build_app()
        self._created = oa.now()
        self._uvicorn: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen and serve (answering 503 until the gRPC server is warm); the bound port."""
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as e:
            raise ConfigError(f"cannot listen for HTTP on {self.host}:{self.port}: "
                              f"{e.strerror or e}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(_Counted(self.app, self.metrics), log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=10,
                                timeout_keep_alive=30)
        self._uvicorn = _Uvicorn(config)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ConfigError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        logger.info("HTTP (OpenAI API) on http://%s:%d/v1 (model name%s %s)", self.host,
                    self.port, "s" if len(self.names) > 1 else "", ", ".join(self.names))
        return self.port

    async def stop(self) -> None:
        """Stop listening; open responses may send what they have left (up to 10 s)."""
        if self._uvicorn is None or self._task is None:
            return
        self._uvicorn.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._uvicorn = self._task = None

    # -- app ---------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(RequestValidationError)
        async def invalid_body(_request, exc: RequestValidationError):
            return _validation_error(exc).response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_request, exc: StarletteHTTPException):
            return ApiError(exc.status_code, str(exc.detail)).response()

        # Known failures are answered here; anything else is a bug: Starlette's last-resort
        # handler logs it and answers 500 (in the same JSON shape).
        async def known_error(_request, exc: Exception):
            return api_error(exc).response()

        for known in (ApiError, JaxinferError, RpcFailure):
            app.add_exception_handler(known, known_error)

        @app.exception_handler(Exception)
        async def any_error(_request, exc: Exception):
            return api_error(exc).response()

        @app.get("/health")
        async def health():
            if self.server.state is State.SERVING:
                return Response(status_code=200)
            what = "warming up" if self.server.state is State.STARTING else "draining"
            return ApiError(503, f"the server is {what}", code="unavailable").response()

        @app.get("/metrics")
        async def metrics():
            if self.metrics is None:
                raise ApiError(404, "this server keeps no metrics")
            from prometheus_client.exposition import CONTENT_TYPE_LATEST

            return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models():
            extra = self._model_details()
            return {"object": "list", "data": [
                {"id": name, "object": "model", "created": self._created,
                 "owned_by": "jaxinfer", "root": model_name(self.server.info) or name, **extra}
                for name in self.names]}

        @app.post("/v1/completions")
        async def completions(body: oa.CompletionRequest, request: HttpRequest):
            return await self._completions(body, request)

        @app.post("/v1/chat/completions")
        async def chat(body: oa.ChatRequest, request: HttpRequest):
            return await self._chat(body, request)

        return app

    def _model_details(self) -> dict:
        """vLLM's max_model_len, and what a load generator needs to build token-id prompts
        (vocab_size, special_token_ids) and to label its report (dtype, quant, mesh)."""
        limits, info = self.server.limits, self.server.info
        if limits is None:
            return {"max_model_len": None}
        tok = self.server.engine.tokenizer
        special = [] if tok is None else [*tok.eos_ids, *([tok.bos_id] if tok.bos_id is not
                                                          None else [])]
        mesh = info.get("mesh") or {}
        devices = mesh.get("devices") or []
        fields = info.get("model_config") or {}
        return {"max_model_len": limits.max_seq_len, "vocab_size": limits.vocab_size,
                "special_token_ids": special,
                "dtype": fields.get("dtype") or info.get("dtype"),
                "quant": info.get("quant") or "none",
                "mesh": ",".join(f"{a}={mesh[a]}" for a in ("dp", "pp", "tp") if a in mesh),
                "device": str(devices[0]) if devices else None}

    # -- requests ----------------------------------------------------------------------------

    def _admit(self, model: str) -> None:
        self.server._check_serving()  # 503 first: nothing else is known during warm-up
        if model not in self.names:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                           f"{', '.join(repr(n) for n in self.names)}", param="model",
                           code="model_not_found")

    def _open(self, reqs: Sequence[Request]) -> list[Stream]:
        """Submit every request, or none (a refusal closes those already submitted)."""
        streams: list[Stream] = []
        try:
            for req in reqs:
                streams.append(self.server.open_stream(req))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def _unary(self, request: HttpRequest, streams: Sequence[Stream], collect):
        """Run `collect()` unless the client goes away first (then cancel its requests)."""
        work = asyncio.create_task(collect())
        gone = asyncio.create_task(_until_disconnect(request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                logger.info("HTTP client went away; cancelling its request(s)")
                return Response(status_code=499)
            return work.result()
        finally:
            gone.cancel()
            for s in streams:
                s.close()

    def _event_stream(self, request: HttpRequest, streams: Sequence[Stream], events
                      ) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield event
            except Exception as e:  # the status line is out: report in the stream
                yield _sse(api_error(e).body())
            finally:
                for s in streams:
                    s.close()
            yield _DONE

        def stalled() -> None:
            for s in streams:
                s.close()
            client = request.client
            self.server.stream_stalled(f"HTTP {request.url.path}", f"{client.host}:{client.port}"
                                       if client else "?")
            # Drop the connection and what it has buffered: a close would wait to flush
            # bytes the client does not read.
            request.scope.get(_ABORT_CONNECTION, lambda: None)()

        return _EventStream(body(), timeout=self.server.cfg.stream_timeout, on_stall=stalled,
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _completions(self, body: oa.CompletionRequest, request: HttpRequest):
        self._admit(body.model)
        tok = self.server.engine.tokenizer
        prompts = oa.completion_prompts(body, tok)
        reqs = oa.completion_requests(body, prompts, limits=self.server.limits)
        streams = self._open(reqs)
        rid, created, n = oa.new_id("cmpl"), oa.now(), body.n
        text_of = oa.TokenText(tok)
        top_n = body.logprobs or 0
        echo = [tok.decode(p) if (body.echo and tok is not None) else "" for p in prompts]
        texts = {i * n + j: "" for i in range(len(reqs)) for j in range(n)}

        def choice(i: int, out: Output, first: bool) -> dict:
            index = i * n + out.index
            text = (echo[i] if first else "") + out.text
            lps = None
            if body.logprobs is not None:
                lps = oa.completion_logprobs(out.logprobs, top_n, text_of,
                                             len(texts[index]) + len(text) - len(out.text))
            texts[index] += text
            return {"index": index, "text": text, "logprobs": lps,
                    "finish_reason": oa.finish_reason(out)}

        def head() -> dict:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": body.model}

        if body.stream:
            return self._event_stream(request, streams, self._completion_events(
                streams, head, choice, body))

        async def collect():
            usages: dict[int, Usage] = {}
            choices: dict[int, dict] = {}
            seen: set[int] = set()
            async for i, batch in _merged(streams):
                for out in batch:
                    index = i * n + out.index
                    c = choice(i, out, index not in seen)
                    seen.add(index)
                    prev = choices.get(index)
                    if prev is None:
                        choices[index] = c
                    else:
                        prev["text"] += c["text"]
                        prev["finish_reason"] = c["finish_reason"] or prev["finish_reason"]
                        if c["logprobs"]:
                            for key in ("tokens", "token_logprobs", "top_logprobs",
                                        "text_offset"):
                                prev["logprobs"][key] += c["logprobs"][key]
                    if out.usage is not None:
                        usages[i] = out.usage
            return {**head(), "choices": [choices[k] for k in sorted(choices)],
                    "usage": oa.usage_json(list(usages.values()))}

        return await self._unary(request, streams, collect)

    async def _completion_events(self, streams, head, choice, body) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}
        usages: dict[int, Usage] = {}
        seen: set[int] = set()
        async for i, batch in _merged(streams):
            for out in batch:
                if out.usage is not None:
                    usages[i] = out.usage
                index = i * body.n + out.index
                first = index not in seen
                seen.add(index)
                c = choice(i, out, first)
                # a chunk for new tokens even when their text is held back (an incomplete
                # character, a possible stop string): clients time token arrival by chunks
                if c["text"] or c["finish_reason"] or out.token_ids:
                    yield _sse({**head(), "choices": [c], **usage_field})
        if include_usage:
            yield _sse({**head(), "choices": [], "usage": oa.usage_json(list(usages.values()))})

    async def _chat(self, body: oa.ChatRequest, request: HttpRequest):
        self._admit(body.model)
        tok = self.server.engine.tokenizer
        prompt = oa.chat_prompt(body, tok, self.chat_template)
        req = oa.chat_request(body, prompt, limits=self.server.limits)
        streams = self._open([req])
        rid, created = oa.new_id("chatcmpl"), oa.now()
        text_of = oa.TokenText(tok)
        top_n = body.top_logprobs or 0

        def head() -> dict:
            return {"id": rid, "object": "chat.completion.chunk" if body.stream else
                    "chat.completion", "created": created, "model": body.model}

        def logprobs(out: Output):
            return oa.chat_logprobs(out.logprobs, top_n, text_of) if body.logprobs else None

        if body.stream:
            async def events() -> AsyncIterator[str]:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                usage_field = {"usage": None} if include_usage else {}
                for j in range(req.n):
                    yield _sse({**head(), "choices": [{
                        "index": j, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}], **usage_field})
                usage = None
                async for _, batch in _merged(streams):
                    for out in batch:
                        usage = out.usage or usage
                        finish = oa.finish_reason(out)
                        if not (out.text or finish or out.token_ids):
                            continue
                        yield _sse({**head(), "choices": [{
                            "index": out.index, "delta": {"content": out.text} if out.text
                            else {}, "logprobs": logprobs(out), "finish_reason": finish}],
                            **usage_field})
                if include_usage:
                    yield _sse({**head(), "choices": [],
                                "usage": oa.usage_json([usage] if usage else [])})

            return self._event_stream(request, streams, events())

        async def collect():
            texts = [""] * req.n
            lps: list[list] = [[] for _ in range(req.n)]
            finish: list[str | None] = [None] * req.n
            usage = None
            async for _, batch in _merged(streams):
                for out in batch:
                    texts[out.index] += out.text
                    if body.logprobs:
                        lps[out.index] += logprobs(out)["content"]
                    finish[out.index] = oa.finish_reason(out) or finish[out.index]
                    usage = out.usage or usage
            return {**head(), "choices": [
                {"index": j, "message": {"role": "assistant", "content": texts[j]},
                 "logprobs": {"content": lps[j]} if body.logprobs else None,
                 "finish_reason": finish[j]} for j in range(req.n)],
                "usage": oa.usage_json([usage] if usage else [])}

        return await self._unary(request, streams, collect)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 as OpenAI's 400: the first problem, naming its parameter."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request body", code="invalid_value")
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # pydantic lists every member of a union it tried; the path's first part is the parameter
    param = loc[0] if loc else None
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {err.get('msg')}",
                        code="invalid_json")
    if err.get("type") == "missing":
        return ApiError(400, f"{param}: this parameter is required", param=param,
                        code="missing_required_parameter")
    where = ".".join(x for x in loc if not x.startswith(("str", "list[", "int")))
    got = err.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (int, float, str, bool, type(None))) else \
        type(got).__name__
    return ApiError(400, f"{where or param}: {err.get('msg')} (got {shown})", param=param,
                    code="invalid_type")


class _EventStream(StreamingResponse):
    """A StreamingResponse whose every write may wait at most `timeout` seconds: a client that
    reads nothing fills the socket, uvicorn's writes then wait on it (flow control), and after
    `timeout` the response gives up and calls `on_stall` (which cancels its requests and drops
    the connection)."""

    def __init__(self, content, *, timeout: float, on_stall, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.timeout = timeout
        self.on_stall = on_stall

    async def stream_response(self, send) -> None:
        async def timed_send(message) -> None:
            try:
                async with asyncio.timeout(self.timeout):
                    await send(message)
            except TimeoutError:
                raise StalledStream(self.timeout) from None

        try:
            await super().stream_response(timed_send)
        except StalledStream:
            self.on_stall()


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # `python -m serve` owns SIGTERM/SIGINT (they drain both protocols); uvicorn's own
        # handlers would replace them.
        yield
