"""The types that cross between the gRPC layer (`serve/server.py`) and the engine
(`serve/engine.py`): a `Request` goes in through `Engine.submit`, `Output`s come back through the
request's callback, and the engine reports what it measures through `EngineMetrics`.

These are plain host-side dataclasses; nothing here touches JAX.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal, Protocol

# stop: EOS, a stop token id or a stop string; length: max_tokens or the context limit;
# cancelled: the caller went away; deadline: its gRPC deadline passed; error: this request failed
# (the engine keeps serving the others); aborted: the server stopped before it finished.
FinishReason = Literal["stop", "length", "cancelled", "deadline", "error", "aborted"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """One request's decoding choices; temperature 0 is greedy. Penalties follow vLLM:
    repetition (>1 discourages) over prompt and output tokens, presence/frequency over output
    tokens only."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None: the engine picks one; sample i of n uses seed + i
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclasses.dataclass(kw_only=True)
class Request:
    """A generation request after the gRPC layer has tokenized it."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingOptions = SamplingOptions()
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # independent samples of the same prompt (they share its prefix pages)
    logprobs: int = 0  # top logprobs returned per generated token; 0 = none
    priority: int = 0  # lower runs first; FIFO within a priority
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    arrival: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    token_id: int
    logprob: float  # of the chosen token under the model's raw distribution
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # over all n samples
    cached_tokens: int  # prompt tokens served from the prefix cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class Output:
    """A streamed piece of one sample of a request. The last one of each sample has a
    `finish_reason`; the last one of the whole request also carries `usage`."""

    request_id: str
    index: int = 0  # sample index in [0, n)
    token_ids: tuple[int, ...] = ()  # tokens new since the previous Output of this sample
    text: str = ""  # text new since the previous Output (stop strings already cut off)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in token_ids, when asked for
    finish_reason: FinishReason | None = None
    error: str | None = None  # set with finish_reason "error"
    usage: Usage | None = None


class EngineMetrics(Protocol):
    """What the engine reports; `serve/metrics.py` implements it with Prometheus. Every method
    must be cheap and thread-safe (the engine calls it from its own threads)."""

    def observe_ttft(self, seconds: float) -> None: ...
    def observe_itl(self, seconds: float) -> None: ...
    def observe_e2e(self, seconds: float) -> None: ...
    def observe_step(self, host_seconds: float, tokens: int,
                     schedule_seconds: float = 0.0) -> None: ...
    def set_state(self, *, queued: int, running: int, batch_occupancy: float, pages_used: int,
                  pages_free: int) -> None: ...
    def add_prefix_lookup(self, *, hit_tokens: int, prompt_tokens: int) -> None: ...
    def add_preemptions(self, n: int) -> None: ...
    def add_recompiles(self, n: int) -> None: ...
