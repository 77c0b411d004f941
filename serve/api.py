"""The protocol boundary: protobuf messages in, validated `serve.types.Request`s out, and
`Output`s back into response messages, for both protocols the server speaks.

Everything a client can get wrong is checked here, before the engine sees the request, so the
caller gets one INVALID_ARGUMENT message naming the field and the limit (STYLE.md rule 15).
The engine validates again where it must (it may know more), and its `RequestError` reaches the
caller the same way. Nothing here touches gRPC itself; `serve/server.py` maps the exceptions to
status codes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jaxinfer.errors import JaxinferError, RequestError
from jaxinfer.tokenizer import Tokenizer
from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jetstream_pb2 as js
from serve.types import Output, Request, SamplingOptions, TokenLogprob, Usage

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256
_MAX_SEED = 2**63

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class PreconditionError(JaxinferError):
    """The request is well formed but this server cannot serve it (gRPC FAILED_PRECONDITION),
    e.g. text for a model that has no tokenizer."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request may ask for; from `Engine.info()` and the model config."""

    vocab_size: int
    max_seq_len: int  # prompt + generated tokens of one sequence (engine and model limit)
    max_tokens: int  # generated tokens per sample
    max_n: int
    max_logprobs: int
    max_queue: int
    page_size: int
    num_pages: int

    @classmethod
    def from_info(cls, info: dict) -> Limits:
        """Read the limits out of `Engine.info()`.

        The model's own context limit also caps `max_seq_len`: the engine may have been
        configured with a longer one than the model's positions support.
        """
        lim = dict(info.get("limits", {}))
        model = _model_fields(info)
        vocab = int(model.get("vocab_size") or info.get("vocab_size") or 0)
        if vocab <= 0:
            raise JaxinferError("Engine.info() reports no vocab_size")
        max_seq = int(lim["max_seq_len"])
        ctx = model.get("max_position_embeddings")
        rope = model.get("rope_scaling")
        rope_type = rope.get("rope_type") if isinstance(rope, dict) else getattr(rope, "rope_type",
                                                                                 None)
        if ctx and rope_type != "dynamic":  # dynamic NTK scaling stretches the context
            max_seq = min(max_seq, int(ctx))
        return cls(vocab_size=vocab, max_seq_len=max_seq,
                   max_tokens=int(lim.get("max_tokens", max_seq)),
                   max_n=int(lim.get("max_n", 1)), max_logprobs=int(lim.get("max_logprobs", 0)),
                   max_queue=int(lim.get("max_queue", 0)), page_size=int(lim.get("page_size", 0)),
                   num_pages=int(lim.get("num_pages", 0)))


def _model_fields(info: dict) -> dict:
    """The ModelConfig fields in `Engine.info()`: under "model_config" / "config", or inline."""
    for key in ("model_config", "config"):
        if isinstance(info.get(key), dict):
            return info[key]
    if isinstance(info.get("model"), dict):
        return info["model"]
    return info


def model_name(info: dict) -> str:
    for key in ("model", "source", "name"):
        if isinstance(info.get(key), str):
            return info[key]
    model = info.get("model")
    if isinstance(model, dict):
        return str(model.get("name") or model.get("source") or "")
    return ""


# -- requests ----------------------------------------------------------------------------------


def _check_ids(ids: Sequence[int], vocab: int, what: str) -> list[int]:
    bad = [int(t) for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"{what}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return [int(t) for t in ids]


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value}")
    return float(value)


def _encode(tokenizer: Tokenizer | None, text: str, add_bos: bool | None) -> list[int]:
    if tokenizer is None:
        raise PreconditionError("the model has no tokenizer: send token ids, not text")
    return tokenizer.encode(text, add_bos=add_bos)


def _max_tokens(requested: int | None, prompt_len: int, limits: Limits, field: str) -> int:
    room = limits.max_seq_len - prompt_len
    if room < 1:
        raise RequestError(f"prompt has {prompt_len} tokens; the context limit is "
                           f"{limits.max_seq_len}, leaving no room to generate")
    if requested is None:
        return min(limits.max_tokens, room)
    if requested < 1:
        raise RequestError(f"{field} must be >= 1, got {requested}")
    if requested > limits.max_tokens:
        raise RequestError(f"{field} {requested} exceeds the server limit {limits.max_tokens}")
    if requested > room:
        raise RequestError(f"prompt ({prompt_len} tokens) + {field} ({requested}) = "
                           f"{prompt_len + requested} exceeds the context limit "
                           f"{limits.max_seq_len}")
    return requested


def _check_n(n: int, limits: Limits, field: str) -> int:
    n = n or 1
    if n < 1:
        raise RequestError(f"{field} must be >= 1, got {n}")
    if n > limits.max_n:
        raise RequestError(f"{field} {n} exceeds the server limit {limits.max_n}")
    return n


def sampling_options(s: pb.SamplingParams, n: int) -> SamplingOptions:
    """Validated sampling options of a jaxinfer.v1 request (defaults for unset fields)."""
    temperature = _finite(s.temperature, "sampling.temperature")
    if temperature < 0:
        raise RequestError(f"sampling.temperature must be >= 0, got {temperature}")
    if s.top_k < -1:
        raise RequestError(f"sampling.top_k must be >= 0 (or -1 for off), got {s.top_k}")
    top_p = _finite(s.top_p, "sampling.top_p") if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise RequestError(f"sampling.top_p must be in (0, 1], got {top_p}")
    min_p = _finite(s.min_p, "sampling.min_p")
    if not 0 <= min_p <= 1:
        raise RequestError(f"sampling.min_p must be in [0, 1], got {min_p}")
    rep = (_finite(s.repetition_penalty, "sampling.repetition_penalty")
           if s.HasField("repetition_penalty") else 1.0)
    if rep <= 0:
        raise RequestError(f"sampling.repetition_penalty must be > 0, got {rep}")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = _finite(getattr(s, name), f"sampling.{name}")
        if not -2 <= value <= 2:
            raise RequestError(f"sampling.{name} must be in [-2, 2], got {value}")
        penalties[name] = value
    seed = None
    if s.HasField("seed"):
        seed = int(s.seed)
        if seed + n > _MAX_SEED:  # sample i uses seed + i
            raise RequestError(f"sampling.seed must be in [0, 2**63 - n), got {seed}")
    return SamplingOptions(temperature=temperature, top_k=max(s.top_k, 0), top_p=top_p,
                           min_p=min_p, seed=seed, repetition_penalty=rep, **penalties)


def generate_request(msg: pb.GenerateRequest, *, request_id: str, tokenizer: Tokenizer | None,
                     limits: Limits, deadline: float | None) -> Request:
    """A validated engine `Request` from a `jaxinfer.v1.GenerateRequest`.

    Raises RequestError (INVALID_ARGUMENT) or PreconditionError (FAILED_PRECONDITION).
    """
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    which = msg.WhichOneof("prompt")
    if which is None:
        raise RequestError("prompt: set either text or token_ids")
    if which == "text":
        if not msg.text:
            raise RequestError("prompt text is empty")
        add_bos = msg.add_bos if msg.HasField("add_bos") else None
        prompt = _encode(tokenizer, msg.text, add_bos)
    else:
        prompt = _check_ids(msg.token_ids.ids, limits.vocab_size, "prompt")
    if not prompt:
        raise RequestError("prompt is empty")
    s = msg.sampling
    n = _check_n(s.n, limits, "sampling.n")
    max_tokens = _max_tokens(s.max_tokens if s.HasField("max_tokens") else None, len(prompt),
                             limits, "sampling.max_tokens")
    sampling = sampling_options(s, n)
    if len(s.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"sampling.stop: at most {MAX_STOP_STRINGS} stop strings")
    for text in s.stop:
        if not text or len(text) > MAX_STOP_STRING_CHARS:
            raise RequestError(f"sampling.stop: each stop string needs 1 to "
                               f"{MAX_STOP_STRING_CHARS} characters, got {len(text)}")
    if s.stop and tokenizer is None:
        raise PreconditionError("sampling.stop: stop strings need a tokenizer, and the model "
                                "has none; use stop_token_ids")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(f"sampling.stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids")
    stop_ids = _check_ids(s.stop_token_ids, limits.vocab_size, "sampling.stop_token_ids")
    logprobs = 0
    if s.HasField("logprobs"):
        if s.logprobs > limits.max_logprobs:
            raise RequestError(f"sampling.logprobs {s.logprobs} exceeds the server limit "
                               f"{limits.max_logprobs}")
        # The engine returns the chosen token's logprob only alongside top ones; for 0, ask for
        # one and drop it when answering (see `token_logprobs`).
        logprobs = max(int(s.logprobs), 1)
    return Request(request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens,
                   sampling=sampling, stop_token_ids=tuple(stop_ids),
                   stop_strings=tuple(s.stop), ignore_eos=s.ignore_eos, n=n, logprobs=logprobs,
                   priority=int(msg.priority), deadline=deadline)


def decode_request(msg: js.DecodeRequest, *, request_id: str, tokenizer: Tokenizer | None,
                   limits: Limits, deadline: float | None) -> tuple[Request, bool]:
    """A validated engine `Request` from a JetStream `DecodeRequest`, and whether the client
    sent token ids (JetStream then answers with token ids only). Greedy, as JetStream's
    default sampling is; JetStream's protocol carries no sampling fields."""
    which = msg.WhichOneof("content")
    if which is None:
        raise RequestError("content: set either text_content or token_content")
    if msg.lora_adapter_id:
        raise RequestError(f"lora_adapter_id {msg.lora_adapter_id!r}: this server serves no "
                           "LoRA adapters")
    if which == "text_content":
        if not msg.text_content.text:
            raise RequestError("text_content.text is empty")
        prompt = _encode(tokenizer, msg.text_content.text, False if msg.has_bos else None)
    else:
        prompt = _check_ids(msg.token_content.token_ids, limits.vocab_size, "token_content")
    if not prompt:
        raise RequestError("prompt is empty")
    if msg.max_tokens < 0:
        raise RequestError(f"max_tokens must be >= 0 (0: up to the context), "
                           f"got {msg.max_tokens}")
    n = _check_n(msg.num_samples, limits, "num_samples")
    max_tokens = _max_tokens(msg.max_tokens or None, len(prompt), limits, "max_tokens")
    req = Request(request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens, n=n,
                  deadline=deadline)
    return req, which == "token_content"


def tokenize(msg: pb.TokenizeRequest, tokenizer: Tokenizer | None) -> pb.TokenizeResponse:
    add_bos = msg.add_bos if msg.HasField("add_bos") else None
    return pb.TokenizeResponse(token_ids=_encode(tokenizer, msg.text, add_bos))


def detokenize(msg: pb.DetokenizeRequest, tokenizer: Tokenizer | None,
               limits: Limits) -> pb.DetokenizeResponse:
    if tokenizer is None:
        raise PreconditionError("the model has no tokenizer")
    ids = _check_ids(msg.token_ids, limits.vocab_size, "token_ids")
    return pb.DetokenizeResponse(text=tokenizer.decode(ids))


# -- responses ---------------------------------------------------------------------------------


def token_logprobs(lps: Sequence[TokenLogprob], requested: int | None) -> list[pb.TokenLogprob]:
    """Logprob messages; `requested` top entries (0: the chosen token's only)."""
    top_n = requested or 0
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top[:top_n]])
            for lp in lps]


def usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens)


def finish_reason(reason: str | None) -> int:
    return _FINISH.get(reason, pb.FINISH_REASON_UNSPECIFIED) if reason else 0


def generate_response(out: Output, *, request_id: str,
                      logprobs: int | None) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=request_id, index=out.index, token_ids=out.token_ids,
                               text=out.text, finish_reason=finish_reason(out.finish_reason))
    if logprobs is not None and out.logprobs:
        resp.logprobs.extend(token_logprobs(out.logprobs, logprobs))
    if out.usage is not None:
        resp.usage.CopyFrom(usage(out.usage))
    return resp


def decode_response(batch: Sequence[Output], *, n: int,
                    with_text: bool) -> js.DecodeResponse | None:
    """One JetStream response for a batch of Outputs (at most one per sample), with one Sample
    per sample of the request, as JetStream sends them; None when the batch carries nothing
    (JetStream clients count every message as a decode step, so no empty ones)."""
    if not any(out.token_ids or (with_text and out.text) for out in batch):
        return None
    samples = [js.DecodeResponse.StreamContent.Sample() for _ in range(n)]
    for out in batch:
        samples[out.index].token_ids.extend(out.token_ids)
        if with_text:
            samples[out.index].text += out.text
    return js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=samples))
