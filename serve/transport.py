"""The wire between the server's front process and its engine-core processes: ZeroMQ sockets
carrying msgspec-encoded messages (MessagePack; typed structs, no pickle).

    front (gRPC, tokenize, detokenize)                 engine core r (scheduler, device loop)
        PUSH  ──── AddRequest / Abort / Shutdown ────▶  PULL   (one pair per core)
        PULL  ◀─── Ready / StartupFailed / Steps ────  PUSH   (every core into one socket)

PUSH/PULL keeps each direction in order and never drops a message (a slow reader makes the
writer queue, it does not lose). Addresses are `ipc://` paths in a private directory for
engine-core processes and `inproc://` names for a core on a thread of the front's own process
(tests, multi-host serving); the messages and the loop are the same either way.
"""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import zmq

from jaxinfer.engine.request import Request, SampleOutput, SamplingOptions, StepStats


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict  # SamplingOptions fields
    stop_token_ids: list[int]
    ignore_eos: bool
    n: int
    logprobs: int
    priority: int
    deadline: float | None
    arrival: float
    stop_strings: list[str]  # the core does not cut them, but they are part of the request


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    reason: str
    index: int = -1  # -1: every sample
    report: bool = True  # send final outputs for what this finishes


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class Ready(msgspec.Struct, tag=True, array_like=True):
    replica: int
    pid: int
    info: str  # EngineCore.info() as JSON


class StartupFailed(msgspec.Struct, tag=True, array_like=True):
    replica: int
    message: str


class Sample(msgspec.Struct, array_like=True):
    request_id: str
    index: int
    token_ids: list[int]
    logprobs: bytes | None  # int32 output rows, row-major
    width: int  # columns of a logprob row
    finish_reason: str | None
    error: str | None
    cached_tokens: int
    scheduled_time: float | None = None


class Steps(msgspec.Struct, tag=True, array_like=True):
    """Everything one or more engine steps produced, with the last step's measurements."""

    replica: int
    samples: list[Sample]
    stats: list[float]  # StepStats fields in order, summed over the steps (gauges: last)
    num_steps: int  # engine steps in this message
    recompiles: int  # compilations after warm-up so far (a bug)
    failed: list[tuple[str, str]]  # (request id, message) refused by the core
    final: bool = False  # the core's last message (after Shutdown)
    received: int = 0  # AddRequests the core has taken so far (the front's count minus this
    # is what is still on the wire: waiting, though no scheduler holds it yet)


ToCore = AddRequest | Abort | Shutdown
FromCore = Ready | StartupFailed | Steps

STAT_FIELDS = tuple(f.name for f in dataclasses.fields(StepStats))
GAUGES = frozenset({"waiting", "running", "pages_used", "pages_free", "num_slots"})

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_from_core = msgspec.msgpack.Decoder(FromCore)


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core.decode(data)


def decode_from_core(data: bytes) -> FromCore:
    return _from_core.decode(data)


def add_request(req: Request) -> AddRequest:
    return AddRequest(req.request_id, list(req.prompt_ids), req.max_tokens,
                      dataclasses.asdict(req.sampling), list(req.stop_token_ids),
                      req.ignore_eos, req.n, req.logprobs, req.priority, req.deadline,
                      req.arrival, list(req.stop_strings))


def request_of(msg: AddRequest) -> Request:
    return Request(request_id=msg.request_id, prompt_ids=msg.prompt_ids,
                   max_tokens=msg.max_tokens, sampling=SamplingOptions(**msg.sampling),
                   stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                   n=msg.n, logprobs=msg.logprobs, priority=msg.priority,
                   deadline=msg.deadline, arrival=msg.arrival,
                   stop_strings=tuple(msg.stop_strings))


def sample_of(o: SampleOutput) -> Sample:
    lp = None if o.logprobs is None else np.ascontiguousarray(o.logprobs, np.int32)
    return Sample(o.request_id, o.index, o.token_ids, None if lp is None else lp.tobytes(),
                  0 if lp is None else lp.shape[1], o.finish_reason, o.error, o.cached_tokens,
                  o.scheduled_time)


def sample_output(s: Sample) -> SampleOutput:
    lp = None
    if s.logprobs is not None:
        lp = np.frombuffer(s.logprobs, np.int32).reshape(-1, s.width)
    return SampleOutput(s.request_id, s.index, s.token_ids, logprobs=lp,
                        finish_reason=s.finish_reason, error=s.error,
                        cached_tokens=s.cached_tokens, scheduled_time=s.scheduled_time)


def stats_list(stats: StepStats) -> list[float]:
    return [float(getattr(stats, f)) for f in STAT_FIELDS]


def stats_of(values: list[float]) -> dict[str, float]:
    return dict(zip(STAT_FIELDS, values))


def push(ctx: zmq.Context, address: str, *, bind: bool,
         send_timeout_ms: int | None = None) -> zmq.Socket:
    """A PUSH socket; with `send_timeout_ms`, a send that cannot complete in that time raises
    zmq.Again instead of blocking (the peer died or stopped reading)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if send_timeout_ms is not None:
        sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    (sock.bind if bind else sock.connect)(address)
    return sock


def pull(ctx: zmq.Context, address: str, *, bind: bool) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(address)
    return sock
