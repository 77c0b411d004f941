"""The gRPC server: `jaxinfer.v1.Generation`, JetStream's `jetstream_proto.Orchestrator`, the
standard `grpc.health.v1` health service and server reflection, all on one `grpc.aio` server.

Threads and queues::

    client ──gRPC──▶ asyncio loop (one thread): handlers parse + validate (serve/api.py),
                     │   Engine.submit(Request, on_output)           ──▶ engine threads
                     │                                                    │
                     │   per-call asyncio.Queue  ◀── loop.call_soon_threadsafe(on_output)
                     ▼
                     handler awaits the queue, converts each Output to a response and streams it

The engine's threads never block on the network: `on_output` only hands the Output to the
loop. Backpressure: what a handler has not yet sent is merged per sample as it arrives (one
growing piece per sample, `_Piece`), so a slow client gets fewer, larger messages and the
buffer never holds more than the request's own tokens; a write that waits `stream_timeout`
seconds (HTTP/2 flow control holds it while the client reads nothing) ends the stream:
its request is cancelled, its pages freed, a warning logged and
`jaxinfer_stalled_streams_total` counted (`_write`; the HTTP front does the same per SSE
write). A call that ends early (the client cancelled or went away, its deadline passed, the
handler failed) cancels its request in the engine from the handler's `finally` (and, as a
safety net, from the call's done-callback), so its KV pages are freed at once.

Life cycle: `start()` binds the port with health NOT_SERVING; `warm_up()` compiles every bucket
in a worker thread, starts the engine and turns health SERVING (generation calls get
UNAVAILABLE until then); `drain()` turns health NOT_SERVING, refuses new work with UNAVAILABLE,
lets the engine finish what it has, waits until every stream has sent its last message, then
stops the gRPC server. `run()` strings these together around a shutdown event, which
`python -m serve` sets on SIGTERM or SIGINT. The OpenAI HTTP front (`serve/http_server.py`)
submits through the same `open_stream` on the same loop, so its requests share this state,
the in-flight count and the drain.

Error mapping (every handler goes through `_guard`): RequestError -> INVALID_ARGUMENT,
PreconditionError -> FAILED_PRECONDITION, CapacityError -> RESOURCE_EXHAUSTED,
UnavailableError -> UNAVAILABLE, a request the engine ends with "deadline" ->
DEADLINE_EXCEEDED, "aborted" -> UNAVAILABLE, "error" -> INTERNAL, a stalled stream ->
CANCELLED (seen by the client only if it reads again), any other exception -> INTERNAL
(logged; the server goes on). A request whose bytes do not parse (for instance a
string field that is not UTF-8, which protobuf rejects) gets INVALID_ARGUMENT too, not the
INTERNAL that gRPC's default deserializer failure would give.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxinfer.config import ServeConfig
from jaxinfer.engine.request import Limits, Output, Request
from jaxinfer.errors import (CapacityError, ConfigError, PreconditionError, RequestError,
                             UnavailableError)
from serve import api
from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jetstream_pb2 as js

logger = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
JETSTREAM_SERVICE = js.DESCRIPTOR.services_by_name["Orchestrator"].full_name
HEALTH_SERVICE = health.SERVICE_NAME
SERVICE_NAMES = (GENERATION_SERVICE, JETSTREAM_SERVICE, HEALTH_SERVICE,
                 reflection.SERVICE_NAME)

# Finish reasons that end the whole call with a status instead of a last message.
_FAILURES = {
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "aborted": grpc.StatusCode.UNAVAILABLE,
    "cancelled": grpc.StatusCode.CANCELLED,
    "error": grpc.StatusCode.INTERNAL,
}


class State(enum.Enum):
    STARTING = "starting"  # bound, warming up
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class RpcFailure(Exception):
    """Ends the current call with `code` and `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class StalledStream(Exception):
    """A streamed write waited `stream_timeout` seconds: the client has stopped reading."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the client read nothing for {timeout:.0f} s")


@dataclasses.dataclass(frozen=True)
class _Unparsable:
    """Stands in for a request whose bytes protobuf refused, so the handler can answer
    INVALID_ARGUMENT with a reason."""

    type_name: str
    reason: str


def _tolerant_parser(cls) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return _Unparsable(cls.DESCRIPTOR.full_name, str(e) or type(e).__name__)

    return parse


def _status_of(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, PreconditionError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return None


class _Piece:
    """What has arrived for one sample and not yet been taken, as one growing Output: a
    stream's buffer holds one of these per sample, however far its client falls behind."""

    __slots__ = ("error", "finish_reason", "first", "logprobs", "texts", "token_ids", "usage")

    def __init__(self, out: Output) -> None:
        self.first = out
        self.token_ids = list(out.token_ids)
        self.texts = [out.text]
        self.logprobs = list(out.logprobs)
        self.finish_reason, self.error, self.usage = out.finish_reason, out.error, out.usage

    def add(self, out: Output) -> None:
        self.token_ids.extend(out.token_ids)
        self.texts.append(out.text)
        self.logprobs.extend(out.logprobs)
        self.finish_reason = out.finish_reason or self.finish_reason
        self.error = out.error or self.error
        self.usage = out.usage or self.usage

    def output(self) -> Output:
        return dataclasses.replace(self.first, token_ids=tuple(self.token_ids),
                                   text="".join(self.texts), logprobs=tuple(self.logprobs),
                                   finish_reason=self.finish_reason, error=self.error,
                                   usage=self.usage)


class _Submission:
    """One request inside the engine; its Outputs arrive on the server's loop in order.

    The buffer between the engine and the client is bounded: Outputs that the handler has
    not taken yet are merged per sample as they arrive (`_Piece`), so a client slower than
    the engine gets fewer, larger messages, and one that reads nothing costs at most the
    request's own tokens, never a growing queue of messages. (The engine never waits for a
    client; `Server._write` ends a stream whose client stops reading for good.)
    """

    def __init__(self, engine, req: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.req = req
        self._loop = loop
        self._pending: dict[int, _Piece] = {}  # sample index -> what it has not sent yet
        self._failure: Output | None = None  # a failure Output, raised after _pending
        self._wake = asyncio.Event()
        self._open = req.n  # samples without a finish reason yet
        self._ended = False  # finished, failed or cancelled: nothing more to cancel
        self.completion_tokens = 0

    def on_output(self, out: Output) -> None:  # called on an engine thread
        try:
            self._loop.call_soon_threadsafe(self._push, out)
        except RuntimeError:  # the loop has closed: the server is gone, nobody is listening
            pass

    def _push(self, out: Output) -> None:
        if self._failure is not None:
            return  # the request has failed; nothing after it is delivered
        if out.finish_reason in _FAILURES:
            self._failure = out
        else:
            piece = self._pending.get(out.index)
            if piece is None:
                self._pending[out.index] = _Piece(out)
            else:
                piece.add(out)
        self._wake.set()

    @property
    def finished(self) -> bool:
        return self._ended or self._open == 0

    async def next_batch(self) -> list[Output]:
        """Everything that has arrived (at least one Output), merged per sample, the Output
        that carries the request's usage last (as it came from the engine).

        Raises RpcFailure when the engine ended the request with a failure reason (after the
        Outputs that came before it have been returned).
        """
        while not self._pending and self._failure is None:
            self._wake.clear()
            await self._wake.wait()
        if not self._pending:
            self._ended = True
            raise self._failure_of(self._failure)
        batch = [piece.output() for piece in self._pending.values()]
        self._pending.clear()
        for out in batch:
            self.completion_tokens += len(out.token_ids)
            if out.finish_reason is not None:
                self._open -= 1
        return sorted(batch, key=lambda o: o.usage is not None)

    def _failure_of(self, out: Output) -> RpcFailure:
        what = {"deadline": "deadline exceeded", "aborted": "server stopped",
                "cancelled": "request cancelled by the server",
                "error": "request failed"}[out.finish_reason]
        detail = f": {out.error}" if out.error else ""
        return RpcFailure(_FAILURES[out.finish_reason],
                          f"{what} after {self.completion_tokens} generated token(s){detail}")

    def cancel(self, reason: str) -> None:
        if self.finished:
            return
        self._ended = True
        try:
            self.engine.cancel(self.req.request_id, reason)
        except Exception:  # the engine may already have dropped it; never fail the caller
            logger.exception("engine.cancel(%s) failed", self.req.request_id)


class Stream:
    """A submitted request as its front sees it (`Server.open_stream`)."""

    def __init__(self, server: Server, sub: _Submission, end_reason: Callable[[], str]) -> None:
        self._server = server
        self._sub = sub
        self._end_reason = end_reason
        self._closed = False

    @property
    def request(self) -> Request:
        return self._sub.req

    async def batches(self) -> AsyncIterator[list[Output]]:
        """Batches of Outputs until every sample has finished; RpcFailure when the engine
        ends the request with a failure reason."""
        while not self._sub.finished:
            yield await self._sub.next_batch()

    def close(self) -> None:
        """Cancel the request if unfinished; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sub.cancel(self._end_reason())
        self._server._stream_closed()


class Server:
    """The gRPC server around an `Engine` (see the module docstring for its life cycle)."""

    def __init__(self, engine, cfg: ServeConfig | None = None, *, metrics=None) -> None:
        self.engine = engine
        self.cfg = cfg or ServeConfig()
        self.metrics = metrics
        self.state = State.STARTING
        self.port: int | None = None
        self.info: dict = {}
        self.limits: Limits | None = None  # known once the engine is warm
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._active = 0  # calls with a request in the engine
        self._drain_started = False
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING until `warm_up`); returns the port."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        size = self.cfg.max_message_bytes
        # Calls that have arrived but that the loop has not picked up yet: past gRPC's
        # defaults (1,000 soft, 3,000 hard) core cancels them unseen (plain CANCELLED), which
        # a burst of a few thousand calls reached; room for ten queues' worth, each then
        # answered (RESOURCE_EXHAUSTED at once when the queue is full).
        pending = max(10 * self.cfg.max_queue, 4096)
        options = [("grpc.max_receive_message_length", size),
                   ("grpc.max_send_message_length", size),
                   ("grpc.server.max_pending_requests", pending),
                   ("grpc.server.max_pending_requests_hard_limit", pending),
                   # Without this a second server on the same port binds silently.
                   ("grpc.so_reuseport", 0)]
        self._grpc = grpc.aio.server(options=options)
        self._grpc.add_generic_rpc_handlers((self._generation_handlers(),
                                             self._jetstream_handlers()))
        for name in ("", GENERATION_SERVICE, JETSTREAM_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(SERVICE_NAMES, self._grpc)
        address = f"{self.cfg.host}:{self.cfg.port}"
        try:
            if self.cfg.tls_cert:
                key = _read(self.cfg.tls_key, "--tls-key")
                creds = grpc.ssl_server_credentials([(key, _read(self.cfg.tls_cert,
                                                                 "--tls-cert"))])
                self.port = self._grpc.add_secure_port(address, creds)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {address}: {e}") from None
        if not self.port:
            raise ConfigError(f"cannot listen on {address} (in use or not a local address)")
        await self._grpc.start()
        logger.info("listening on %s (warming up)", self.address)
        return self.port

    async def warm_up(self, *, progress: bool = True) -> None:
        """Compile every bucket, start the engine and turn health SERVING."""
        t0 = time.perf_counter()
        await asyncio.to_thread(self.engine.warmup, progress=progress)
        # the front's pid beside the cores': what a soak reads the server's RSS from
        self.info = {**self.engine.info(), "front_pid": os.getpid()}
        self.limits = Limits.from_info(self.info,
                                       has_tokenizer=self.engine.tokenizer is not None)
        self.engine.start()
        if self.state is not State.STARTING:  # a shutdown came in while warming up
            return
        self.state = State.SERVING
        for name in ("", GENERATION_SERVICE, JETSTREAM_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("SERVING on %s%s (model %s, warm-up %.1f s)", self.address,
                    " with TLS" if self.cfg.tls_cert else "", api.model_name(self.info) or "?",
                    time.perf_counter() - t0)

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work, finish what is in flight, stop. True when nothing was cut off."""
        timeout = self.cfg.drain_timeout if timeout is None else timeout
        if self._drain_started or self.state is State.STOPPED:
            return True
        self._drain_started = True
        logger.info("draining: %d call(s) in flight", self._active)
        self.state = State.DRAINING
        t0 = time.monotonic()
        await self._health.enter_graceful_shutdown()
        clean = await asyncio.to_thread(self.engine.drain, timeout)
        if not clean:
            logger.warning("drain timed out after %.0f s; stopping the engine", timeout)
            await asyncio.to_thread(self.engine.stop)
        try:  # the engine is done; let every handler send its last messages
            await asyncio.wait_for(self._idle.wait(),
                                   max(1.0, timeout - (time.monotonic() - t0)))
        except TimeoutError:
            clean = False
            logger.warning("%d call(s) still open after the drain", self._active)
        await self.stop(grace=1.0)
        return clean

    async def stop(self, grace: float | None = 0.0) -> None:
        self.state = State.STOPPED
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await asyncio.to_thread(self.engine.stop)

    async def run(self, shutdown: asyncio.Event, *, progress: bool = True) -> bool:
        """start -> warm_up -> wait for `shutdown` -> drain. True when the drain was clean."""
        if self._grpc is None:
            await self.start()
        try:
            await self.warm_up(progress=progress)
        except BaseException:  # a core that cannot start: stop listening before the loop ends
            await self.stop()
            raise
        await shutdown.wait()
        return await self.drain()

    def request_shutdown_state(self) -> None:
        """Refuse new generation at once (called from a signal handler, before `drain`)."""
        if self.state in (State.STARTING, State.SERVING):
            self.state = State.DRAINING

    # -- plumbing ----------------------------------------------------------------------------

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None and hasattr(self.metrics, "count_request"):
            self.metrics.count_request(method, code.name)

    def _fail(self, method: str, exc: BaseException) -> RpcFailure:
        code = _status_of(exc)
        if code is None:
            logger.exception("%s failed", method, exc_info=exc)
            return RpcFailure(grpc.StatusCode.INTERNAL,
                              f"internal error: {type(exc).__name__}: {exc}")
        return RpcFailure(code, str(exc))

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, request, context):
        """Every handler's error mapping and request count: a failure aborts the call with its
        status (module docstring); a cancelled or closed call is counted, not aborted."""
        code = grpc.StatusCode.OK
        try:
            self._check_parsed(request)
            yield
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except StalledStream as e:
            # The request is cancelled already (`_stream` closed it). The status queues behind
            # the unread messages: the client sees it if it ever reads again, and gRPC drops
            # the call when the client goes away or its deadline passes.
            code = grpc.StatusCode.CANCELLED
            self.stream_stalled("gRPC " + method, context.peer())
            await context.abort(code, f"stream cancelled: {e}")
        except (asyncio.CancelledError, GeneratorExit):
            code = _cancel_code(context)
            raise
        except Exception as e:
            failure = e if isinstance(e, RpcFailure) else self._fail(method, e)
            code = failure.code
            await context.abort(failure.code, failure.details)
        finally:
            self._count(method, code)

    def _unary(self, method: str, fn, request_cls) -> grpc.RpcMethodHandler:
        async def handler(request, context):
            async with self._guard(method, request, context):
                return await fn(request, context)

        return grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=_tolerant_parser(request_cls),
            response_serializer=_serialize)

    def _stream(self, method: str, fn, request_cls) -> grpc.RpcMethodHandler:
        async def handler(request, context):
            # aclosing: a stalled write must close `fn` (and cancel its request) now, not
            # when the generator is collected
            async with (self._guard(method, request, context),
                        contextlib.aclosing(fn(request, context)) as items):
                async for item in items:
                    await self._write(context, item)

        return grpc.unary_stream_rpc_method_handler(
            handler, request_deserializer=_tolerant_parser(request_cls),
            response_serializer=_serialize)

    async def _write(self, context, item) -> None:
        """Send one streamed message; StalledStream when the client takes none of it within
        `stream_timeout` (HTTP/2 flow control holds the write while the client reads
        nothing)."""
        try:
            async with asyncio.timeout(self.cfg.stream_timeout):
                await context.write(item)
        except TimeoutError:
            raise StalledStream(self.cfg.stream_timeout) from None

    def stream_stalled(self, front: str, who: str) -> None:
        """Log and count a stream ended because its client stopped reading (both fronts)."""
        logger.warning("%s stream to %s: the client has read nothing for %.0f s; cancelled "
                       "its request (its KV pages are freed)", front, who,
                       self.cfg.stream_timeout)
        if self.metrics is not None and hasattr(self.metrics, "count_stalled_stream"):
            self.metrics.count_stalled_stream(front)

    @staticmethod
    def _check_parsed(request) -> None:
        if isinstance(request, _Unparsable):
            hint = "" if "UTF-8" in request.reason else " (string fields must be valid UTF-8)"
            raise RequestError(f"cannot parse {request.type_name}: {request.reason}{hint}")

    def _deadline(self, context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _check_serving(self) -> None:
        if self.state is State.STARTING:
            raise UnavailableError("the server is warming up; retry shortly")
        if self.state is not State.SERVING:
            raise UnavailableError("the server is draining and accepts no new requests")

    async def _outputs(self, req: Request, context) -> AsyncIterator[list[Output]]:
        """`outputs` for a gRPC call: its deadline decides the end reason, and the call's
        done-callback cancels the request too (a safety net for a handler never resumed)."""
        async for batch in self.outputs(req, end_reason=lambda: _end_reason(context),
                                        on_submitted=lambda cancel: context.add_done_callback(
                                            lambda _ctx: cancel())):
            yield batch

    async def outputs(self, req: Request, *, end_reason: Callable[[], str] = lambda: "cancelled",
                      on_submitted: Callable[[Callable[[], None]], None] | None = None
                      ) -> AsyncIterator[list[Output]]:
        """Submit `req` and yield batches of its Outputs (`Stream.batches`) until every sample
        has finished. However the caller stops iterating (done, failed, cancelled), an
        unfinished request is cancelled. `on_submitted(cancel)` lets the caller cancel it
        from a callback too."""
        stream = self.open_stream(req, end_reason=end_reason)
        if on_submitted is not None:
            on_submitted(stream.close)
        try:
            async for batch in stream.batches():
                yield batch
        finally:
            stream.close()

    def open_stream(self, req: Request, *, end_reason: Callable[[], str] = lambda: "cancelled"
                    ) -> Stream:
        """Submit `req` now; every front (gRPC, HTTP) goes through here, so drain and the
        in-flight count cover them all. The caller must `close()` the stream (which cancels
        an unfinished request with `end_reason()` and frees its pages at once).

        Raises UnavailableError unless serving, and the engine's RequestError or CapacityError.
        """
        self._check_serving()
        sub = _Submission(self.engine, req, self._loop)
        self.engine.submit(req, sub.on_output)  # raises RequestError, CapacityError, ...
        self._active += 1
        self._idle.clear()
        return Stream(self, sub, end_reason)

    def _stream_closed(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    # -- jaxinfer.v1.Generation --------------------------------------------------------------

    def _generation_handlers(self) -> grpc.GenericRpcHandler:
        m = {
            "Generate": self._stream("Generate", self._generate, pb.GenerateRequest),
            "GenerateUnary": self._unary("GenerateUnary", self._generate_unary,
                                         pb.GenerateRequest),
            "Tokenize": self._unary("Tokenize", self._tokenize, pb.TokenizeRequest),
            "Detokenize": self._unary("Detokenize", self._detokenize, pb.DetokenizeRequest),
            "ServerInfo": self._unary("ServerInfo", self._server_info, pb.ServerInfoRequest),
        }
        return grpc.method_handlers_generic_handler(GENERATION_SERVICE, m)

    def _v1_request(self, msg: pb.GenerateRequest, context) -> tuple[Request, str, int | None]:
        self._check_serving()
        req = api.generate_request(msg, request_id=uuid.uuid4().hex,
                                   tokenizer=self.engine.tokenizer, limits=self.limits,
                                   deadline=self._deadline(context))
        client_id = msg.request_id or req.request_id
        logprobs = msg.sampling.logprobs if msg.sampling.HasField("logprobs") else None
        return req, client_id, logprobs

    async def _generate(self, msg: pb.GenerateRequest, context):
        req, client_id, logprobs = self._v1_request(msg, context)
        async for batch in self._outputs(req, context):
            for out in batch:
                yield api.generate_response(out, request_id=client_id, logprobs=logprobs)

    async def _generate_unary(self, msg: pb.GenerateRequest, context):
        req, client_id, logprobs = self._v1_request(msg, context)
        done = [pb.Completion(index=i) for i in range(req.n)]
        resp = pb.GenerateUnaryResponse(request_id=client_id)
        async for batch in self._outputs(req, context):
            for out in batch:
                c = done[out.index]
                c.token_ids.extend(out.token_ids)
                c.text += out.text
                if logprobs is not None:
                    c.logprobs.extend(api.token_logprobs(out.logprobs, logprobs))
                if out.finish_reason is not None:
                    c.finish_reason = api.finish_reason(out.finish_reason)
                if out.usage is not None:
                    resp.usage.CopyFrom(api.usage(out.usage))
        resp.completions.extend(done)
        return resp

    async def _tokenize(self, msg: pb.TokenizeRequest, context):
        return api.tokenize(msg, self.engine.tokenizer)

    async def _detokenize(self, msg: pb.DetokenizeRequest, context):
        if self.limits is None:
            raise UnavailableError("the server is warming up; retry shortly")
        return api.detokenize(msg, self.engine.tokenizer, self.limits)

    async def _server_info(self, msg: pb.ServerInfoRequest, context):
        return server_info(self.info, self.limits, serving=self.state is State.SERVING,
                           max_message_bytes=self.cfg.max_message_bytes,
                           has_tokenizer=self.engine.tokenizer is not None)

    # -- jetstream_proto.Orchestrator --------------------------------------------------------

    def _jetstream_handlers(self) -> grpc.GenericRpcHandler:
        m = {
            "Decode": self._stream("Decode", self._decode, js.DecodeRequest),
            "HealthCheck": self._unary("HealthCheck", self._health_check,
                                       js.HealthCheckRequest),
        }
        return grpc.method_handlers_generic_handler(JETSTREAM_SERVICE, m)

    async def _decode(self, msg: js.DecodeRequest, context):
        self._check_serving()
        req, ids_only = api.decode_request(msg, request_id=uuid.uuid4().hex,
                                           tokenizer=self.engine.tokenizer, limits=self.limits,
                                           deadline=self._deadline(context))
        with_text = not ids_only and self.engine.tokenizer is not None
        async for batch in self._outputs(req, context):
            resp = api.decode_response(batch, n=req.n, with_text=with_text)
            if resp is not None:
                yield resp

    async def _health_check(self, msg: js.HealthCheckRequest, context):
        return js.HealthCheckResponse(is_live=self.state is State.SERVING)


def _cancel_code(context) -> grpc.StatusCode:
    if _end_reason(context) == "deadline":
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


# A client cancels its call at its own deadline, which started before the server's (by the
# headers' transit and the time the server took to read them), so a call cancelled this close
# to the server's deadline ended by the deadline.
DEADLINE_SLACK_S = 0.25


def _end_reason(context) -> str:
    remaining = context.time_remaining()
    return ("deadline" if remaining is not None and remaining <= DEADLINE_SLACK_S
            else "cancelled")


def _serialize(msg) -> bytes:
    return msg.SerializeToString()


def _read(path: str | None, flag: str) -> bytes:
    if not path:
        raise ConfigError(f"{flag} is required with TLS")
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None


def server_info(info: dict, limits: Limits | None, *, serving: bool, max_message_bytes: int,
                has_tokenizer: bool) -> pb.ServerInfoResponse:
    """`ServerInfo` from `Engine.info()` (typed fields where the engine reports them, and the
    whole dict as JSON); during warm-up (no limits yet) only what is known."""
    from jaxinfer import __version__ as version

    m = api._model_fields(info)
    model = pb.ModelInfo(name=api.model_name(info), has_tokenizer=has_tokenizer,
                         vocab_size=limits.vocab_size if limits else 0)
    for field in ("family", "dtype", "kernels"):
        value = m.get(field, info.get(field))
        if isinstance(value, str):
            setattr(model, field, value)
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings"):
        if isinstance(m.get(field), int):
            setattr(model, field, m[field])
    if isinstance(m.get("bos_token_id"), int):
        model.bos_token_id = m["bos_token_id"]
    model.eos_token_ids.extend(int(i) for i in m.get("eos_token_ids", ()) or ())
    resp = pb.ServerInfoResponse(model=model, version=version, serving=serving,
                                 engine_json=json.dumps(info, default=str, sort_keys=True))
    for name, sizes in (info.get("buckets") or {}).items():
        if isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
            resp.buckets[str(name)].sizes.extend(sizes)
    mesh = info.get("mesh")
    if isinstance(mesh, dict):
        for axis in ("dp", "pp", "tp"):
            if isinstance(mesh.get(axis), int):
                setattr(resp.mesh, axis, mesh[axis])
        resp.mesh.devices.extend(str(d) for d in mesh.get("devices", ()) or ())
    if limits is None:
        return resp
    resp.limits.CopyFrom(pb.Limits(max_seq_len=limits.max_seq_len, max_tokens=limits.max_tokens,
                                   max_n=limits.max_n, max_logprobs=limits.max_logprobs,
                                   max_queue=limits.max_queue, page_size=limits.page_size,
                                   num_pages=limits.num_pages,
                                   max_message_bytes=max_message_bytes))
    return resp
