"""The client behaviours of the soak harness (`serve/soak.py`), one coroutine per kind, over
gRPC (`grpc.aio`) and HTTP (a small HTTP/1.1 client on asyncio streams, so a test can stop
reading, read slowly or drop the connection exactly when it wants; no HTTP library allows all
three).

Every coroutine returns one `Outcome`: the status the request ended with (a gRPC code name, or
`HTTP <status>`), what it received, and whether its stream was well formed (one finish per
sample, nothing after it). The checks against the reference are `serve/soak.py`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time

import grpc

from serve.protos import jaxinfer_v1_pb2 as pb

CHUNK_LIMIT = 1 << 20  # longest SSE line or header block read (a bound, not a tuning)


@dataclasses.dataclass
class Outcome:
    """How one request ended, as its client saw it."""

    kind: str
    front: str  # "grpc" or "http"
    code: str  # "OK", a gRPC code name ("CANCELLED", ...), or "HTTP 429", "HTTP 503", ...
    prompt: int = -1  # index into the reference prompts (-1: none, e.g. malformed)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finishes: int = 0  # finish reasons received (exactly one for a complete greedy request)
    after_finish: int = 0  # messages that came after the finish: an answer given twice
    finish_reason: str = ""
    ttft: float | None = None
    seconds: float = 0.0
    detail: str = ""


def generate_request(prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


# -- gRPC ----------------------------------------------------------------------------------

async def grpc_stream(stub, kind: str, index: int, prompt: list[int], max_tokens: int, *,
                      timeout: float, read_at_most: int | None = None,
                      pause: float = 0.0, hold: asyncio.Event | None = None) -> Outcome:
    """A streamed Generate. `read_at_most`: cancel after that many messages; `pause`: seconds
    between reads (a slow reader); `hold`: after the first message stop reading until the
    event is set, then cancel (a client that stops reading)."""
    out = Outcome(kind, "grpc", "OK", index)
    t0 = time.monotonic()
    call = stub.Generate(generate_request(prompt, max_tokens), timeout=timeout)
    read = 0
    try:
        async for msg in call:
            read += 1
            _add_grpc_message(out, msg, t0)
            if hold is not None:
                await hold.wait()
            if hold is not None or (read_at_most is not None and read >= read_at_most):
                # the client cuts the stream: its tokens must be a prefix, whether or not
                # the server had finished it meanwhile (then cancel() is a no-op)
                call.cancel()
                out.code = "CANCELLED"
                break
            if pause:
                await asyncio.sleep(pause)
    except grpc.aio.AioRpcError as e:
        out.code, out.detail = e.code().name, e.details() or ""
    except asyncio.CancelledError:
        out.code = "CANCELLED"
    if call.cancelled():
        out.code = "CANCELLED"
    out.seconds = time.monotonic() - t0
    return out


def _add_grpc_message(out: Outcome, msg, t0: float) -> None:
    if out.finishes:
        out.after_finish += 1
    if msg.token_ids and out.ttft is None:
        out.ttft = time.monotonic() - t0
    out.token_ids.extend(msg.token_ids)
    out.text += msg.text
    if msg.finish_reason:
        out.finishes += 1
        out.finish_reason = pb.FinishReason.Name(msg.finish_reason)


async def grpc_unary(stub, kind: str, index: int, prompt: list[int], max_tokens: int, *,
                     timeout: float) -> Outcome:
    out = Outcome(kind, "grpc", "OK", index)
    t0 = time.monotonic()
    try:
        resp = await stub.GenerateUnary(generate_request(prompt, max_tokens), timeout=timeout)
        c = resp.completions[0]
        out.token_ids, out.text = list(c.token_ids), c.text
        out.finishes = sum(1 for c in resp.completions if c.finish_reason)
        out.finish_reason = pb.FinishReason.Name(c.finish_reason)
        out.ttft = time.monotonic() - t0
    except grpc.aio.AioRpcError as e:
        out.code, out.detail = e.code().name, e.details() or ""
    out.seconds = time.monotonic() - t0
    return out


async def grpc_disconnect(target: str, kind: str, index: int, prompt: list[int],
                          max_tokens: int, *, read: int, timeout: float) -> Outcome:
    """A client on a channel of its own that reads `read` messages and closes the channel
    (its connection goes with it) instead of cancelling the call."""
    channel = grpc.aio.insecure_channel(target)
    out = Outcome(kind, "grpc", "DISCONNECTED", index)
    t0 = time.monotonic()
    try:
        from serve.protos import jaxinfer_v1_pb2_grpc as pbg

        call = pbg.GenerationStub(channel).Generate(generate_request(prompt, max_tokens),
                                                    timeout=timeout)
        n = 0
        async for msg in call:
            _add_grpc_message(out, msg, t0)
            n += 1
            if n >= read:
                break
        else:
            out.code = "OK"  # it finished before the client went away
    except grpc.aio.AioRpcError as e:
        out.code, out.detail = e.code().name, e.details() or ""
    finally:
        await channel.close(grace=None)
    out.seconds = time.monotonic() - t0
    return out


async def grpc_raw(channel, kind: str, method: str, payload: bytes, *, timeout: float
                   ) -> Outcome:
    """Bytes that are not a valid request, sent as one (malformed input)."""
    out = Outcome(kind, "grpc", "OK")
    t0 = time.monotonic()
    try:
        await channel.unary_unary(method)(payload, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        out.code, out.detail = e.code().name, e.details() or ""
    out.seconds = time.monotonic() - t0
    return out


# -- HTTP ----------------------------------------------------------------------------------

class HttpConnection:
    """One HTTP/1.1 request on a connection of its own (`Connection: close`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0

    @classmethod
    async def open(cls, host: str, port: int, *, rcvbuf: int | None = None) -> HttpConnection:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if rcvbuf is not None:  # before connect, so the kernel keeps it small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK_LIMIT)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json") -> None:
        """Send the request and read the status line and headers."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status = await self.reader.readline()
        self.status = int(status.split()[1])
        self.chunked = False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "transfer-encoding" and "chunked" in value.lower():
                self.chunked = True
        self._buf = b""

    async def body(self) -> bytes:
        data = b""
        while (chunk := await self._chunk()) is not None:
            data += chunk
        return data

    async def events(self):
        """Server-sent events, one `data:` payload (str) at a time."""
        while True:
            while b"\n\n" not in self._buf:
                chunk = await self._chunk()
                if chunk is None:
                    return
                self._buf += chunk
            event, self._buf = self._buf.split(b"\n\n", 1)
            yield event.decode().removeprefix("data: ")

    async def _chunk(self) -> bytes | None:
        if not self.chunked:
            data = await self.reader.read(65536)
            return data or None
        size = int((await self.reader.readline()).strip() or b"0", 16)
        if size == 0:
            await self.reader.readline()
            return None
        data = await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return data

    def abort(self) -> None:
        """Drop the connection at once (RST), without a word to the server."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def completion_body(model: str, prompt: list[int], max_tokens: int, *, stream: bool) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": stream,
                       **({"stream_options": {"include_usage": True}} if stream else {})}
                      ).encode()


async def http_stream(host: str, port: int, model: str, kind: str, index: int,
                      prompt: list[int], max_tokens: int, *, timeout: float,
                      read_at_most: int | None = None, pause: float = 0.0) -> Outcome:
    """A streamed /v1/completions. `read_at_most`: drop the connection after that many events
    (a client that disconnects); `pause`: seconds between events (a slow reader)."""
    out = Outcome(kind, "http", "OK", index)
    t0 = time.monotonic()
    conn = await HttpConnection.open(host, port)
    try:
        async with asyncio.timeout(timeout):
            await conn.request("POST", "/v1/completions",
                               completion_body(model, prompt, max_tokens, stream=True))
            if conn.status != 200:
                out.code, out.detail = f"HTTP {conn.status}", (await conn.body())[:200].decode()
                return out
            n = 0
            done = False
            async for data in conn.events():
                n += 1
                if done:
                    out.after_finish += 1
                    continue
                if data == "[DONE]":
                    done = True
                    continue
                _add_http_event(out, json.loads(data), t0)
                if read_at_most is not None and n >= read_at_most:
                    conn.abort()
                    out.code = "DISCONNECTED"
                    return out
                if pause:
                    await asyncio.sleep(pause)
            if not done:
                out.code, out.detail = "TRUNCATED", "the stream ended without data: [DONE]"
    except TimeoutError:
        out.code = "CLIENT_TIMEOUT"
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
        out.code, out.detail = "CONNECTION_LOST", f"{type(e).__name__}: {e}"
    finally:
        out.seconds = time.monotonic() - t0
        if out.code != "DISCONNECTED":
            await conn.close()
    return out


def _add_http_event(out: Outcome, event: dict, t0: float) -> None:
    if "error" in event:
        out.code, out.detail = "STREAM_ERROR", json.dumps(event["error"])[:200]
        return
    for choice in event.get("choices", ()):
        if out.ttft is None:
            out.ttft = time.monotonic() - t0
        if out.finishes:
            out.after_finish += 1
        out.text += choice.get("text") or ""
        if choice.get("finish_reason"):
            out.finishes += 1
            out.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if usage:
        out.token_ids = [-1] * int(usage["completion_tokens"])  # the count, not the ids


async def http_unary(host: str, port: int, kind: str, body: bytes, *, timeout: float,
                     index: int = -1, content_type: str = "application/json",
                     path: str = "/v1/completions") -> Outcome:
    """One non-streamed request (a completion, or a malformed body)."""
    out = Outcome(kind, "http", "OK", index)
    t0 = time.monotonic()
    try:
        conn = await HttpConnection.open(host, port)
    except OSError as e:  # a draining server may already have closed its port
        out.code, out.detail = "REFUSED", str(e)
        return out
    try:
        async with asyncio.timeout(timeout):
            await conn.request("POST", path, body, content_type)
            payload = await conn.body()
        if conn.status != 200:
            out.code, out.detail = f"HTTP {conn.status}", payload[:200].decode(errors="replace")
            return out
        resp = json.loads(payload)
        c = resp["choices"][0]
        out.text, out.finish_reason = c["text"], c["finish_reason"] or ""
        out.finishes = 1 if c["finish_reason"] else 0
        out.token_ids = [-1] * int(resp["usage"]["completion_tokens"])
    except TimeoutError:
        out.code = "CLIENT_TIMEOUT"
    except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError) as e:
        out.code, out.detail = "CONNECTION_LOST", f"{type(e).__name__}: {e}"
    finally:
        out.seconds = time.monotonic() - t0
        await conn.close()
    return out


async def http_stalled(host: str, port: int, model: str, kind: str, index: int,
                       prompt: list[int], max_tokens: int, *, hold: asyncio.Event) -> Outcome:
    """A streaming client that reads nothing at all until `hold` is set, then hangs up."""
    out = Outcome(kind, "http", "STALLED", index)
    t0 = time.monotonic()
    conn = await HttpConnection.open(host, port, rcvbuf=4096)
    try:
        body = completion_body(model, prompt, max_tokens, stream=True)
        conn.writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: "
                           f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                          + body)
        await conn.writer.drain()
        await hold.wait()
    finally:
        conn.abort()
        out.seconds = time.monotonic() - t0
    return out


def health_probe(target: str, http: tuple[str, int] | None, stop, results) -> None:
    """In a process of its own (so the harness's busy loop and GIL do not delay it): until
    `stop` (a multiprocessing Event) is set, every 50 ms one gRPC health check and one HTTP
    /health (when given), each timed alone; puts ({front: seconds}, statuses) on `results`
    (a multiprocessing Queue)."""
    import urllib.error
    import urllib.request

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    while not stop.is_set():
        what, took = [], {}
        t0 = time.monotonic()
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            what.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
        except grpc.RpcError as e:
            what.append(e.code().name)
        took["grpc"] = time.monotonic() - t0
        if http is not None:
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://{http[0]}:{http[1]}/health",
                                            timeout=10) as resp:
                    resp.read()
                    what.append(f"HTTP {resp.status}")
            except OSError as e:  # URLError, HTTPError, timeouts, refused
                what.append(f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError)
                            else type(e).__name__)
            took["http"] = time.monotonic() - t0
        results.put((took, ",".join(what)))
        stop.wait(0.05)
