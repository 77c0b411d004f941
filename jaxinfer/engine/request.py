"""What a generation request is, what comes back, and the one check every request passes.

These are plain host-side types (no JAX): the gRPC front (`serve/`), the engine-core process
and offline generation (`jaxinfer.engine.llm`) all speak them. `validate_request` is the single
validation path: every front converts its protocol into a `Request`, then calls it with the
engine's `Limits`, so a bad value gets the same `RequestError` (gRPC INVALID_ARGUMENT) whatever
the entry point; `names` maps field names to the protocol's own spelling for the message.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Mapping
from typing import Literal

import numpy as np

from jaxinfer.errors import PreconditionError, RequestError

# stop: EOS, a stop token id or a stop string; length: max_tokens or the context limit;
# cancelled: the caller went away; deadline: its deadline passed; error: this request failed
# (the engine keeps serving the others); aborted: the engine stopped before it finished.
FinishReason = Literal["stop", "length", "cancelled", "deadline", "error", "aborted"]
FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error", "aborted")

MAX_SEED = 2**63
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_REQUEST_ID_CHARS = 256
_FLOAT32_MAX = 3.4028234663852886e38


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

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


@dataclasses.dataclass(kw_only=True)
class Request:
    """A generation request after its front has tokenized it."""

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
    error: str | None = None  # set with finish_reason "error" or "aborted"
    usage: Usage | None = None


@dataclasses.dataclass
class SampleOutput:
    """What one engine-core step produced for one sample of a request (before text)."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: np.ndarray | None = None  # [len(token_ids), 2 + 2k] int32 output rows
    finish_reason: FinishReason | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    # time.monotonic() of the sample's first admission (None: not yet); one clock for every
    # process of a host, so the front can compare it with `Request.arrival`
    scheduled_time: float | None = None


@dataclasses.dataclass
class StepStats:
    """What one `step()` measured; the server's metrics and stats line read it."""

    host_seconds: float = 0.0  # schedule + dispatch + read back + apply
    schedule_seconds: float = 0.0  # schedule() and update_from_output()
    num_batched_tokens: int = 0
    num_steps: int = 0  # decode tokens per row of the dispatched step (0: no decode)
    decode_rows: int = 0
    prefill_tokens: int = 0  # prompt (or recomputed) tokens dispatched
    generated_tokens: int = 0  # tokens applied to requests by this step
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    prefix_lookup_tokens: int = 0
    waiting: int = 0
    running: int = 0
    pages_used: int = 0
    pages_free: int = 0
    num_slots: int = 0
    # Speculative decoding in the step read back (vLLM's spec_decode counters): rows that got
    # drafts, draft tokens proposed, drafts kept, and drafts kept at draft position i.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_pos_0: int = 0
    spec_accepted_pos_1: int = 0
    spec_accepted_pos_2: int = 0
    spec_accepted_pos_3: int = 0
    spec_accepted_pos_4: int = 0
    spec_accepted_pos_5: int = 0
    spec_accepted_pos_6: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request may ask of one engine (`EngineCore.limits()`; the fronts read it from
    the engine's info)."""

    vocab_size: int
    max_seq_len: int  # prompt + generated tokens of one sequence (engine and model limit)
    max_tokens: int  # generated tokens per sample
    max_n: int
    max_logprobs: int
    max_stop_token_ids: int
    max_queue: int = 0  # waiting requests before CapacityError (0: not reported)
    page_size: int = 0
    num_pages: int = 0
    has_tokenizer: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> Limits:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_info(cls, info: Mapping, *, has_tokenizer: bool | None = None) -> Limits:
        """The limits in an engine's info dict (`EngineCore.info()`; the vocabulary from its
        model config when the limits leave it out)."""
        lim = dict(info.get("limits", {}))
        model = info.get("model_config") or {}
        lim.setdefault("vocab_size", model.get("vocab_size", 0))
        lim.setdefault("max_tokens", lim.get("max_seq_len", 0) - 1)
        lim.setdefault("max_stop_token_ids", 64)
        if has_tokenizer is not None:
            lim["has_tokenizer"] = has_tokenizer
        if not lim.get("vocab_size") or not lim.get("max_seq_len"):
            raise ValueError("engine info reports no vocab_size or max_seq_len")
        return cls.from_json(lim)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_request(req: Request, limits: Limits, *, names: Mapping[str, str] | None = None
                     ) -> None:
    """Raise RequestError (or PreconditionError) naming the first field that is wrong.

    `names` maps a `Request` field (or a `SamplingOptions` one) to the name the caller's
    protocol gives it, e.g. {"max_tokens": "sampling.max_tokens"}."""
    names = names or {}

    def name(field: str) -> str:
        return names.get(field, field)

    if not isinstance(req.request_id, str) or not req.request_id:
        raise RequestError(f"{name('request_id')} must be a non-empty string")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(f"{name('request_id')} is longer than {MAX_REQUEST_ID_CHARS} "
                           "characters")
    prompt = req.prompt_ids
    if len(prompt) == 0:
        raise RequestError(f"{name('prompt_ids')} is empty")
    if not all(_is_int(t) for t in prompt):
        raise RequestError(f"{name('prompt_ids')} must be a flat list of integers")
    bad = [int(t) for t in prompt if not 0 <= t < limits.vocab_size]
    if bad:
        raise RequestError(f"{name('prompt_ids')}: token ids {bad[:5]} outside the vocabulary "
                           f"[0, {limits.vocab_size})")
    if not _is_int(req.max_tokens):
        raise RequestError(f"{name('max_tokens')} must be an integer, got {req.max_tokens!r}")
    if req.max_tokens < 1:
        raise RequestError(f"{name('max_tokens')} must be >= 1, got {req.max_tokens}")
    if req.max_tokens > limits.max_tokens:
        raise RequestError(f"{name('max_tokens')} {req.max_tokens} exceeds the limit "
                           f"{limits.max_tokens}")
    total = len(prompt) + req.max_tokens
    if total > limits.max_seq_len:
        raise RequestError(f"prompt ({len(prompt)} tokens) + {name('max_tokens')} "
                           f"({req.max_tokens}) = {total} exceeds the context limit "
                           f"{limits.max_seq_len}")
    if limits.num_pages and -(-total // limits.page_size) > limits.num_pages:
        raise RequestError(f"the request needs {-(-total // limits.page_size)} KV pages; the "
                           f"pool has {limits.num_pages}")
    if not _is_int(req.n) or req.n < 1:
        raise RequestError(f"{name('n')} must be an integer >= 1, got {req.n!r}")
    if req.n > limits.max_n:
        raise RequestError(f"{name('n')} {req.n} exceeds the server limit {limits.max_n}")
    if not _is_int(req.logprobs) or not 0 <= req.logprobs <= limits.max_logprobs:
        raise RequestError(f"{name('logprobs')} must be in [0, {limits.max_logprobs}], got "
                           f"{req.logprobs!r}")
    if not _is_int(req.priority):
        raise RequestError(f"{name('priority')} must be an integer, got {req.priority!r}")
    _validate_sampling(req.sampling, req.n, name)
    if len(req.stop_token_ids) > limits.max_stop_token_ids:
        raise RequestError(f"{name('stop_token_ids')}: at most {limits.max_stop_token_ids} "
                           "ids")
    for t in req.stop_token_ids:
        if not _is_int(t) or not 0 <= t < limits.vocab_size:
            raise RequestError(f"{name('stop_token_ids')}: token id {t!r} is outside the "
                               f"vocabulary [0, {limits.vocab_size})")
    if isinstance(req.stop_strings, str) or not isinstance(req.stop_strings, (tuple, list)):
        raise RequestError(f"{name('stop_strings')} must be a list of strings")
    if isinstance(req.stop_token_ids, str) or not isinstance(req.stop_token_ids, (tuple, list)):
        raise RequestError(f"{name('stop_token_ids')} must be a list of token ids")
    if len(req.stop_strings) > MAX_STOP_STRINGS:
        raise RequestError(f"{name('stop_strings')}: at most {MAX_STOP_STRINGS} stop strings")
    for s in req.stop_strings:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS:
            raise RequestError(f"{name('stop_strings')}: each stop string needs 1 to "
                               f"{MAX_STOP_STRING_CHARS} characters")
    if req.stop_strings and not limits.has_tokenizer:
        raise PreconditionError(f"{name('stop_strings')}: stop strings need a tokenizer, and "
                                "the model has none; use stop token ids")
    if req.deadline is not None and (not _number(req.deadline)
                                     or not math.isfinite(req.deadline)):
        raise RequestError("deadline must be a finite time.monotonic() value")


def _validate_sampling(s: SamplingOptions, n: int, name) -> None:
    def finite(field: str) -> float:
        value = getattr(s, field)
        # finite as the float32 the device holds it in, too
        if not _number(value) or not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise RequestError(f"{name(field)} must be a finite number, got {value!r}")
        return float(value)

    if finite("temperature") < 0:
        raise RequestError(f"{name('temperature')} must be >= 0, got {s.temperature}")
    if not _is_int(s.top_k) or not 0 <= s.top_k < 2**31:
        raise RequestError(f"{name('top_k')} must be an integer in [0, 2**31) (0 = off), got "
                           f"{s.top_k!r}")
    if not 0 < finite("top_p") <= 1:
        raise RequestError(f"{name('top_p')} must be in (0, 1], got {s.top_p}")
    if not 0 <= finite("min_p") <= 1:
        raise RequestError(f"{name('min_p')} must be in [0, 1], got {s.min_p}")
    if finite("repetition_penalty") <= 0:
        raise RequestError(f"{name('repetition_penalty')} must be > 0 (1 = off), got "
                           f"{s.repetition_penalty}")
    for field in ("presence_penalty", "frequency_penalty"):
        if not -2 <= finite(field) <= 2:
            raise RequestError(f"{name(field)} must be in [-2, 2] (0 = off), got "
                               f"{getattr(s, field)}")
    if s.seed is not None and (not _is_int(s.seed) or not 0 <= s.seed <= MAX_SEED - n):
        raise RequestError(f"{name('seed')} must be an integer in [0, 2**63 - n], got "
                           f"{s.seed!r}")
