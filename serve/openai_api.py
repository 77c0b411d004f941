"""The OpenAI HTTP protocol: request bodies (pydantic models), their conversion into engine
`Request`s, and the JSON of responses and stream chunks.

Like `serve/api.py` for gRPC, this converts only: text to token ids (the chat template for
`messages`), OpenAI's defaults and spellings to `SamplingOptions`; every value is then checked
once by `serve.api.build_request` -> `validate_request`, with OpenAI's parameter names, so a
bad value gets a 400 naming the parameter. Parameters OpenAI defines that would change the
answer and this server cannot honour (tools, response_format, logit_bias, ...) are refused
with a 400 rather than ignored; purely informational ones (user, metadata) are ignored.

Imported only by `serve/http_server.py` (pydantic comes with FastAPI), so the gRPC-only server
runs without them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxinfer.chat_template import NO_TEMPLATE, ChatTemplate
from jaxinfer.engine.request import Limits, Output, Request, SamplingOptions, TokenLogprob, Usage
from jaxinfer.errors import RequestError
from jaxinfer.tokenizer import Tokenizer
from serve import api

# Request / SamplingOptions fields as OpenAI (and vLLM's extra parameters) name them.
COMPLETION_NAMES = {"prompt_ids": "prompt", "stop_strings": "stop", "request_id": "request_id"}
CHAT_NAMES = {**COMPLETION_NAMES, "prompt_ids": "messages", "logprobs": "top_logprobs"}
PARAM_NAMES = frozenset({
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
    "echo", "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids",
    "stream_options", "best_of", "logit_bias", "suffix", "tools", "tool_choice",
    "response_format", "functions", "function_call", "add_generation_prompt"})
MAX_PROMPTS = 64  # prompts in one completions request (each is a request in the engine)


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI's own server and vLLM do for forward compatibility.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM: BOS by the model's rule for text prompts


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, ...) go to the template as they are.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    # vLLM's extra parameters for chat
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


_Body.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()


def _refuse_unsupported(body: _Body) -> None:
    if body.logit_bias:
        raise RequestError("logit_bias: not supported by this server")
    if isinstance(body, CompletionRequest):
        if body.best_of is not None and body.best_of != body.n:
            raise RequestError("best_of: only best_of == n is supported")
        if body.suffix:
            raise RequestError("suffix: not supported by this server")
    if isinstance(body, ChatRequest):
        if body.tools or body.functions:
            raise RequestError(f"{'tools' if body.tools else 'functions'}: tool calling is not "
                               "supported by this server")
        for name in ("tool_choice", "function_call"):
            if getattr(body, name) not in (None, "none"):
                raise RequestError(f"{name}: tool calling is not supported by this server")
        fmt = (body.response_format or {}).get("type", "text")
        if fmt != "text":
            raise RequestError(f"response_format: type {fmt!r} is not supported (only 'text')")


def sampling_options(body: _Body) -> SamplingOptions:
    """OpenAI's defaults (temperature 1, top_p 1) and vLLM's top_k (-1 or 0: off)."""
    if body.top_k is not None and body.top_k < -1:
        raise RequestError(f"top_k must be >= 0 (or -1 for off), got {body.top_k}")
    return SamplingOptions(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p, seed=body.seed, repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)


def _stops(body: _Body) -> tuple[str, ...]:
    if body.stop is None:
        return ()
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)


def _need_tokenizer(tokenizer: Tokenizer | None, what: str) -> Tokenizer:
    if tokenizer is None:
        raise RequestError(f"{what}: the model has no tokenizer; send token ids")
    return tokenizer


def completion_prompts(body: CompletionRequest, tokenizer: Tokenizer | None) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, token ids, or lists of those."""
    p = body.prompt
    if isinstance(p, str):
        texts: list = [p]
    elif not p:
        raise RequestError("prompt is empty")
    elif all(isinstance(x, int) for x in p):
        return [list(p)]
    else:
        texts = list(p)
    if len(texts) > MAX_PROMPTS:
        raise RequestError(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(texts)}")
    out = []
    for x in texts:
        if isinstance(x, list):
            out.append(list(x))
            continue
        if not x:
            raise RequestError("prompt: a prompt is empty")
        tok = _need_tokenizer(tokenizer, "prompt")
        out.append(tok.encode(x, add_bos=None if body.add_special_tokens else False))
    return out


def _message_text(content) -> str:
    """A message's content as one string (a list of parts: the text parts, one per line, as
    vLLM joins them); non-text parts are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages: content part of type {part.get('type')!r} is not "
                               "supported (text only)")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_prompt(body: ChatRequest, tokenizer: Tokenizer | None,
                template: ChatTemplate | None) -> list[int]:
    """The conversation rendered by the chat template, tokenized without a second BOS."""
    if template is None:
        raise RequestError(f"messages: {NO_TEMPLATE}")
    tok = _need_tokenizer(tokenizer, "messages")
    messages = [{**m.model_dump(exclude_none=False), "content": _message_text(m.content)}
                for m in body.messages]
    text = template.render(messages, add_generation_prompt=body.add_generation_prompt,
                           **(body.chat_template_kwargs or {}))
    return tok.encode(text, add_bos=False)


def completion_requests(body: CompletionRequest, prompts: Sequence[list[int]], *,
                        limits: Limits, deadline: float | None = None) -> list[Request]:
    _refuse_unsupported(body)
    if body.echo and body.logprobs is not None:
        raise RequestError("echo: echo with logprobs needs the prompt's logprobs, which this "
                           "server does not compute; ask for one of the two")
    sampling = sampling_options(body)
    return [api.build_request(
        request_id=uuid.uuid4().hex, prompt=p, limits=limits, names=COMPLETION_NAMES,
        # OpenAI's completions default is 16 tokens
        max_tokens=16 if body.max_tokens is None else body.max_tokens, sampling=sampling,
        stop_token_ids=tuple(body.stop_token_ids or ()), stop_strings=_stops(body),
        ignore_eos=body.ignore_eos, n=body.n, logprobs=body.logprobs, deadline=deadline)
        for p in prompts]


def chat_request(body: ChatRequest, prompt: list[int], *, limits: Limits,
                 deadline: float | None = None) -> Request:
    _refuse_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs: needs logprobs true")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    names = dict(CHAT_NAMES, max_tokens="max_completion_tokens"
                 if body.max_completion_tokens is not None else "max_tokens")
    return api.build_request(
        request_id=uuid.uuid4().hex, prompt=prompt, limits=limits, names=names,
        max_tokens=max_tokens, sampling=sampling_options(body),
        stop_token_ids=tuple(body.stop_token_ids or ()), stop_strings=_stops(body),
        ignore_eos=body.ignore_eos, n=body.n,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None, deadline=deadline)


# -- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_json(usages: Sequence[Usage]) -> dict:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)}}


class TokenText:
    """Token ids to the strings logprobs report (each token decoded on its own)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._tok.decode([token_id]) if self._tok is not None else f"token_id:{token_id}"
            self._cache[token_id] = s
        return s


def completion_logprobs(lps: Sequence[TokenLogprob], top_n: int, text: TokenText,
                        offset: int) -> dict:
    """The legacy completions `logprobs` object for some tokens; `offset` is the length of the
    choice's text before them."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        s = text(lp.token_id)
        tokens.append(s)
        token_lps.append(lp.logprob)
        tops.append({text(t): v for t, v in lp.top[:top_n]} if top_n else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(lps: Sequence[TokenLogprob], top_n: int, text: TokenText) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        s = text(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top[:top_n]]}
                        for lp in lps]}


FinishReason = Literal["stop", "length"]


def finish_reason(out: Output) -> str | None:
    return out.finish_reason if out.finish_reason in ("stop", "length") else None
