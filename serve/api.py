"""The protocol boundary: protobuf messages in, `Request`s out, and `Output`s back into
response messages, for both protocols the server speaks.

Each front only converts its protocol (which fields are set, text to token ids, defaults such
as max_tokens up to the context); every value is then checked once, by
`jaxinfer.engine.request.validate_request`, with the protocol's own field names, so the caller
gets one INVALID_ARGUMENT message naming the field and the limit (STYLE.md rule 15). Nothing
here touches gRPC itself; `serve/server.py` maps the exceptions to status codes.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxinfer.engine.request import (MAX_REQUEST_ID_CHARS, Limits, Output, Request,
                                     SamplingOptions, TokenLogprob, Usage, validate_request)
from jaxinfer.errors import PreconditionError, RequestError
from jaxinfer.tokenizer import Tokenizer
from serve.protos import jaxinfer_v1_pb2 as pb
from serve.protos import jetstream_pb2 as js

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}

# Request fields as jaxinfer.v1 names them (sampling options live in `sampling`).
V1_NAMES = {name: f"sampling.{name}" for name in (
    "temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_tokens", "n", "logprobs", "stop_token_ids")}
V1_NAMES.update(stop_strings="sampling.stop", prompt_ids="prompt", request_id="request_id")
JETSTREAM_NAMES = {"n": "num_samples", "prompt_ids": "token_content"}


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


def _encode(tokenizer: Tokenizer | None, text: str, add_bos: bool | None) -> list[int]:
    if tokenizer is None:
        raise PreconditionError("the model has no tokenizer: send token ids, not text")
    return tokenizer.encode(text, add_bos=add_bos)


def _max_tokens(requested: int | None, prompt_len: int, limits: Limits) -> int:
    """The protocol's default when max_tokens is unset: up to the context limit."""
    room = limits.max_seq_len - prompt_len
    if room < 1:
        raise RequestError(f"prompt has {prompt_len} tokens; the context limit is "
                           f"{limits.max_seq_len}, leaving no room to generate")
    return min(limits.max_tokens, room) if requested is None else requested


def sampling_options(s: pb.SamplingParams) -> SamplingOptions:
    """Sampling options of a jaxinfer.v1 request, defaults for unset fields (top_k -1 = off);
    `validate_request` checks the values."""
    if s.top_k < -1:
        raise RequestError(f"sampling.top_k must be >= 0 (or -1 for off), got {s.top_k}")
    return SamplingOptions(
        temperature=s.temperature, top_k=max(s.top_k, 0),
        top_p=s.top_p if s.HasField("top_p") else 1.0, min_p=s.min_p,
        seed=int(s.seed) if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty)


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
        prompt = [int(t) for t in msg.token_ids.ids]
    if not prompt:
        raise RequestError("prompt is empty")
    s = msg.sampling
    return build_request(
        request_id=request_id, prompt=prompt, limits=limits, names=V1_NAMES,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        sampling=sampling_options(s), stop_token_ids=tuple(s.stop_token_ids),
        stop_strings=tuple(s.stop), ignore_eos=s.ignore_eos, n=s.n or 1,
        logprobs=int(s.logprobs) if s.HasField("logprobs") else None,
        priority=int(msg.priority), deadline=deadline)


def build_request(*, request_id: str, prompt: list[int], limits: Limits, names: dict,
                  max_tokens: int | None, sampling: SamplingOptions,
                  stop_token_ids: tuple = (), stop_strings: tuple = (), ignore_eos: bool = False,
                  n: int = 1, logprobs: int | None = None, priority: int = 0,
                  deadline: float | None = None) -> Request:
    """The validated engine `Request` every protocol's converter ends in (gRPC's
    `generate_request`, the OpenAI HTTP API's): max_tokens defaults to the room left in the
    context, and `logprobs` (None: not asked; 0: the chosen token's only) becomes the engine's
    top-k count. Raises RequestError naming the field as `names` spells it."""
    if not prompt:
        raise RequestError(f"{names.get('prompt_ids', 'prompt')} is empty")
    max_tokens = _max_tokens(max_tokens, len(prompt), limits)
    engine_logprobs = 0
    if logprobs is not None:
        # The engine returns the chosen token's logprob only alongside top ones; for 0, ask for
        # one and drop it when answering (see `token_logprobs`).
        engine_logprobs = max(int(logprobs), 1) if logprobs >= 0 else int(logprobs)
    req = Request(request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens,
                  sampling=sampling, stop_token_ids=tuple(stop_token_ids),
                  stop_strings=tuple(stop_strings), ignore_eos=ignore_eos, n=n,
                  logprobs=engine_logprobs, priority=priority, deadline=deadline)
    validate_request(req, limits, names=names)
    return req


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
        prompt = [int(t) for t in msg.token_content.token_ids]
    if not prompt:
        raise RequestError("prompt is empty")
    if msg.max_tokens < 0:
        raise RequestError(f"max_tokens must be >= 0 (0: up to the context), "
                           f"got {msg.max_tokens}")
    max_tokens = _max_tokens(msg.max_tokens or None, len(prompt), limits)
    req = Request(request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens,
                  n=msg.num_samples or 1, deadline=deadline)
    validate_request(req, limits, names=JETSTREAM_NAMES)
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
