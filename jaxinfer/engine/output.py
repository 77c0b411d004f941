"""From the engine core's token ids to what a caller sees: text, stop strings, logprobs, usage.

`OutputProcessor` is the one output path, run by every front: the server's (in its own process,
beside gRPC, off the engine core's GIL: `serve/engine_client.py`) and offline generation
(`jaxinfer.engine.llm`). It takes the core's `SampleOutput`s, detokenizes each sample
incrementally, cuts stop strings, parses logprob rows (`jaxinfer.engine.packing`) and builds
`Output`s; a sample that hits a stop string is reported back (`ProcessedStep.stopped`) so the
caller finishes it in the core.

`TextStream` turns a sample's token ids into text deltas (`IncrementalDetokenizer`) and applies
stop strings the way OpenAI-style servers do: the text is cut just before the first stop string
and the sample finishes; text that could still become the start of a stop string is held back
until the next token settles it, so a client never sees a stop string, nor a piece of one that
later has to be taken back.

Why holding back is enough: what was already sent never ends with a proper prefix of a stop
string, so a stop string can only begin inside the held-back text or the new delta, and one
search over their concatenation finds it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxinfer.engine import packing
from jaxinfer.engine.request import Output, Request, SampleOutput, TokenLogprob, Usage
from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class TextStream:
    """Text deltas of one sample, with stop strings.

    Args:
        tokenizer: None for a model without tokenizer files (text stays empty).
        prompt_ids: the prompt, as context for the first generated token's text.
        stop_strings: strings that end the sample when they appear in its text.
    """

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: Sequence[int],
                 stop_strings: Sequence[str] = ()) -> None:
        self._detok = None if tokenizer is None else IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = tuple(s for s in stop_strings if s)
        self._held = ""
        self.stopped = False

    def add(self, ids: Sequence[int], *, final: bool = False) -> str:
        """Text that is new and safe to send after `ids`; with `final`, everything left.
        Sets `stopped` (and returns the text before the stop string) when one appears."""
        if self.stopped or self._detok is None:
            return ""
        text = self._held + self._detok.add(ids)
        if final:
            text += self._detok.flush()
        self._held = ""
        if not self._stops:
            return text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        if final:
            return text
        keep = self._partial_stop_len(text)
        if keep:
            self._held = text[-keep:]
            return text[:-keep]
        return text

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class _Sample:
    __slots__ = ("done", "last_time", "num_tokens", "text")

    def __init__(self, text: TextStream) -> None:
        self.text = text
        self.done = False
        self.last_time: float | None = None
        self.num_tokens = 0


class RequestOutputs:
    """One request's output state (its samples' text streams, counts and times)."""

    __slots__ = ("completion_tokens", "failed", "first_token_time", "left", "on_output",
                 "request", "samples", "scheduled_time")

    def __init__(self, request: Request, tokenizer: Tokenizer | None,
                 on_output: Callable[[Output], None] | None) -> None:
        self.request = request
        self.on_output = on_output
        self.samples = [_Sample(TextStream(tokenizer, request.prompt_ids, request.stop_strings))
                        for _ in range(request.n)]
        self.left = request.n
        self.completion_tokens = 0
        self.first_token_time: float | None = None
        self.scheduled_time: float | None = None  # first admission of any of its samples
        self.failed = False

    @property
    def finished(self) -> bool:
        return self.left == 0


@dataclasses.dataclass
class ProcessedStep:
    """What `OutputProcessor.process` made of one step's outputs."""

    outputs: list[tuple[RequestOutputs, Output]]  # in order; each request's last carries usage
    stopped: list[tuple[str, int]]  # (request id, sample index) ended by a stop string
    completed: list[RequestOutputs]  # requests whose every sample has finished


class OutputProcessor:
    """Detokenization, stop strings, logprobs and usage for the requests of one engine.

    Args:
        tokenizer: None for a model without tokenizer files (text stays empty).
        metrics: optional sink with `observe_ttft`, `observe_itl`, `observe_e2e` (seconds).
    """

    def __init__(self, tokenizer: Tokenizer | None, metrics=None) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.requests: dict[str, RequestOutputs] = {}

    def add(self, request: Request, on_output: Callable[[Output], None] | None = None
            ) -> RequestOutputs:
        state = RequestOutputs(request, self.tokenizer, on_output)
        self.requests[request.request_id] = state
        return state

    def remove(self, request_id: str) -> RequestOutputs | None:
        return self.requests.pop(request_id, None)

    def process(self, outs: Sequence[SampleOutput], now: float | None = None) -> ProcessedStep:
        """Turn the core's outputs (of one or more steps, in order) into Outputs: one per
        sample per call, with every token that arrived for it."""
        now = time.monotonic() if now is None else now
        step = ProcessedStep([], [], [])
        groups: dict[tuple[str, int], list[SampleOutput]] = {}
        for o in outs:
            groups.setdefault((o.request_id, o.index), []).append(o)
        for (rid, index), group in groups.items():
            state = self.requests.get(rid)
            if state is None or state.failed:
                continue
            if state.request.stop_strings:  # token by token: find the exact stop
                parts = [_one_token(o, i) for o in group for i in range(max(len(o.token_ids), 1))]
            else:
                parts = [_merge(group)]
            for part in parts:
                self._emit(state, index, part, now, step)
                if state.samples[index].done:
                    break
        for state in step.completed:
            self.requests.pop(state.request.request_id, None)
        return step

    def fail(self, request_id: str, message: str, reason="error") -> list[tuple[RequestOutputs,
                                                                                 Output]]:
        """Final `reason` Outputs for every unfinished sample of a request (it failed outside
        the core, or the core went away); the request is forgotten."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        state.failed = True
        state.left = 0
        self._finished(state, reason, time.monotonic())
        out = []
        for i, sample in enumerate(state.samples):
            if not sample.done:
                sample.done = True
                out.append((state, Output(request_id=request_id, index=i, finish_reason=reason,
                                          error=message)))
        return out

    def _emit(self, state: RequestOutputs, index: int, o: SampleOutput, now: float,
              step: ProcessedStep) -> None:
        sample = state.samples[index]
        if sample.done:
            return
        req = state.request
        finish, error = o.finish_reason, o.error
        if o.scheduled_time is not None and (state.scheduled_time is None
                                             or o.scheduled_time < state.scheduled_time):
            state.scheduled_time = o.scheduled_time
        tokens = tuple(o.token_ids)
        logprobs: tuple[TokenLogprob, ...] = ()
        if tokens:
            # A stop token's (or EOS's) own text is not part of the output.
            shown = tokens[:-1] if finish == "stop" else tokens
            text = sample.text.add(shown, final=finish is not None)
            if req.logprobs and o.logprobs is not None:
                logprobs = tuple(_token_logprob(row, t, req.logprobs)
                                 for row, t in zip(o.logprobs, tokens))
            n = len(tokens)
            sample.num_tokens += n
            state.completion_tokens += n
            self._metric("add_generation_tokens", n)
            if state.first_token_time is None:
                state.first_token_time = now
                self._metric("observe_ttft", now - req.arrival)
                self._metric("add_prompt_tokens", len(req.prompt_ids))
            if sample.last_time is not None:
                for _ in range(n):
                    self._metric("observe_itl", (now - sample.last_time) / n)
            sample.last_time = now
            if sample.text.stopped:
                if finish is None:  # the core still runs it: the caller finishes it there
                    step.stopped.append((req.request_id, index))
                finish, error = "stop", None
        else:
            text = "" if sample.text.stopped else sample.text.add((), final=finish is not None)
        if finish is None and not tokens and not text:
            return
        if finish is not None:
            sample.done = True
            state.left -= 1
        usage = None
        if finish is not None and state.left == 0:
            usage = Usage(prompt_tokens=len(req.prompt_ids),
                          completion_tokens=state.completion_tokens,
                          cached_tokens=o.cached_tokens)
            step.completed.append(state)
            if finish not in ("error", "aborted", "cancelled", "deadline"):
                self._metric("observe_e2e", now - req.arrival)
            self._finished(state, finish, now)
        step.outputs.append((state, Output(request_id=req.request_id, index=index,
                                           token_ids=tokens, text=text, logprobs=logprobs,
                                           finish_reason=finish, error=error, usage=usage)))

    def _finished(self, state: RequestOutputs, finish: str, now: float) -> None:
        """vLLM's per-request metrics: finish reason, and the request's time split into
        queue (arrival -> first admission), prefill (-> first token) and decode (-> last)."""
        req = state.request
        scheduled, first = state.scheduled_time, state.first_token_time
        if first is None:  # never produced a token: its prompt was not counted yet
            self._metric("add_prompt_tokens", len(req.prompt_ids))
        self._metric("observe_request", finish,
                     queue=None if scheduled is None else max(scheduled - req.arrival, 0.0),
                     prefill=None if scheduled is None or first is None
                     else max(first - scheduled, 0.0),
                     decode=None if first is None else now - first)

    def _metric(self, name: str, *args, **kwargs) -> None:
        if self.metrics is not None:
            try:
                method = getattr(self.metrics, name, None)
                if method is not None:  # a sink may implement only some of them
                    method(*args, **kwargs)
            except Exception:  # a metrics bug must not stop serving
                logger.exception("metrics.%s failed", name)


def _merge(group: Sequence[SampleOutput]) -> SampleOutput:
    """One SampleOutput of a sample's outputs of several steps (in order)."""
    if len(group) == 1:
        return group[0]
    rows = [g.logprobs for g in group if g.logprobs is not None]
    last = group[-1]
    return SampleOutput(last.request_id, last.index, [t for g in group for t in g.token_ids],
                        logprobs=None if not rows else np.concatenate(rows),
                        finish_reason=next((g.finish_reason for g in group if g.finish_reason),
                                           None),
                        error=next((g.error for g in group if g.error), None),
                        cached_tokens=last.cached_tokens,
                        scheduled_time=next((g.scheduled_time for g in group
                                             if g.scheduled_time is not None), None))


def _one_token(o: SampleOutput, i: int) -> SampleOutput:
    """The i-th token of `o` on its own (the finish reason rides on the last one)."""
    last = i >= len(o.token_ids) - 1
    return SampleOutput(o.request_id, o.index, o.token_ids[i: i + 1],
                        logprobs=None if o.logprobs is None else o.logprobs[i: i + 1],
                        finish_reason=o.finish_reason if last else None,
                        error=o.error if last else None, cached_tokens=o.cached_tokens,
                        scheduled_time=o.scheduled_time)


def _token_logprob(row, token: int, k: int) -> TokenLogprob:
    lp, top = packing.unpack_logprobs(row, k)
    return TokenLogprob(token_id=token, logprob=lp, top=top)
