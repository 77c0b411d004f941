"""A test double of `serve.engine_client.EngineClient` whose outputs can be worked out by hand, for testing
the gRPC layer quickly and without JAX (the integration tests use the real engine).

Sample i of a request emits, at its j-th generated position, the byte
`97 + (sum(prompt) + i + j) % 26` (a lowercase letter), one token per sample per tick of a
worker thread. It honours max_tokens, stop token ids, stop strings, deadlines, n, logprobs,
cancellation (pages freed at once), a bounded queue (CapacityError), drain and stop, and keeps
page accounting that `stats()` reports, like the real engine's contract says.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

from jaxinfer.errors import CapacityError, RequestError, UnavailableError
from jaxinfer.tokenizer import ByteTokenizer
from jaxinfer.engine.request import Output, Request, TokenLogprob, Usage

FAIL_TOKEN = 300  # a prompt containing this id makes the "engine" fail that request


def expected_tokens(prompt: list[int], n_tokens: int, index: int = 0) -> list[int]:
    base = sum(prompt) + index
    return [97 + (base + j) % 26 for j in range(n_tokens)]


@dataclasses.dataclass
class _Live:
    req: Request
    on_output: Callable[[Output], None]
    pages: int = 0
    generated: list[list[int]] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)
    open: list[bool] = dataclasses.field(default_factory=list)


class StubEngine:
    def __init__(self, *, vocab_size: int = 512, max_seq_len: int = 256, max_tokens: int = 200,
                 max_n: int = 4, max_logprobs: int = 5, max_queue: int = 8, max_running: int = 4,
                 page_size: int = 16, num_pages: int = 256, tick: float = 0.002,
                 with_tokenizer: bool = True) -> None:
        self.tokenizer = ByteTokenizer(vocab_size) if with_tokenizer else None
        self.vocab_size = vocab_size
        self.max_seq_len, self.max_tokens, self.max_n = max_seq_len, max_tokens, max_n
        self.max_logprobs, self.max_queue, self.max_running = max_logprobs, max_queue, max_running
        self.page_size, self.num_pages, self.tick = page_size, num_pages, tick
        self.num_recompiles = 0
        self.cancelled: list[tuple[str, str]] = []  # (request id, reason) of cancel calls
        self._lock = threading.Condition()
        self._waiting: list[_Live] = []
        self._running: dict[str, _Live] = {}
        self._pages_used = 0
        self._accepting = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.warmed = False

    # -- Engine API ------------------------------------------------------------------------

    def warmup(self, *, progress: bool = True) -> None:
        time.sleep(0.05)
        self.warmed = True

    def start(self) -> None:
        with self._lock:
            self._accepting = True
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stub-engine")
        self._thread.start()

    def submit(self, req: Request, on_output: Callable[[Output], None]) -> None:
        if any(not 0 <= t < self.vocab_size for t in req.prompt_ids):
            raise RequestError("prompt token out of vocabulary")
        if len(req.prompt_ids) + req.max_tokens > self.max_seq_len:
            raise RequestError("prompt + max_tokens over the context")
        with self._lock:
            if not self._accepting:
                raise UnavailableError("engine not accepting requests")
            if len(self._waiting) >= self.max_queue:
                raise CapacityError(f"queue full ({self.max_queue} waiting)")
            self._waiting.append(_Live(req, on_output, generated=[[] for _ in range(req.n)],
                                       texts=["" for _ in range(req.n)],
                                       open=[True] * req.n))
            self._lock.notify_all()

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        with self._lock:
            self.cancelled.append((request_id, reason))
            live = self._running.pop(request_id, None)
            if live is None:
                for i, w in enumerate(self._waiting):
                    if w.req.request_id == request_id:
                        live = self._waiting.pop(i)
                        break
            if live is not None:
                self._pages_used -= live.pages
                live.pages = 0

    def drain(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._accepting = False
            while self._waiting or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def stop(self) -> None:
        with self._lock:
            self._accepting = False
            self._stopped = True
            victims = self._waiting + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
            self._pages_used = 0
            self._lock.notify_all()
        for live in victims:
            for i in range(live.req.n):
                live.on_output(Output(request_id=live.req.request_id, index=i,
                                      finish_reason="aborted"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def info(self) -> dict:
        return {
            "model": "stub", "model_config": {"vocab_size": self.vocab_size, "family": "llama",
                                              "max_position_embeddings": 4096,
                                              "bos_token_id": 256, "eos_token_ids": [257]},
            "buckets": {"batch": [1, 2, 4]}, "mesh": {"dp": 1, "pp": 1, "tp": 1},
            "limits": {"max_seq_len": self.max_seq_len, "max_tokens": self.max_tokens,
                       "max_n": self.max_n, "max_logprobs": self.max_logprobs,
                       "max_queue": self.max_queue, "page_size": self.page_size,
                       "num_pages": self.num_pages, "max_stop_token_ids": 64},
        }

    def stats(self) -> dict:
        with self._lock:
            return {"pages_used": self._pages_used,
                    "pages_free": self.num_pages - self._pages_used,
                    "running": len(self._running), "waiting": len(self._waiting)}

    # -- worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                self._admit()
                lives = list(self._running.values())
                if not lives:
                    self._lock.wait(0.05)
                    continue
            for live in lives:
                self._step(live)
            time.sleep(self.tick)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_running:
            live = self._waiting[0]
            need = live.req.n * math.ceil(
                (len(live.req.prompt_ids) + live.req.max_tokens) / self.page_size)
            if self._pages_used + need > self.num_pages:
                return
            self._waiting.pop(0)
            live.pages = need
            self._pages_used += need
            self._running[live.req.request_id] = live

    def _finish(self, live: _Live) -> None:
        with self._lock:
            if self._running.pop(live.req.request_id, None) is not None:
                self._pages_used -= live.pages
                live.pages = 0
            self._lock.notify_all()

    def _step(self, live: _Live) -> None:
        req = live.req
        with self._lock:
            if req.request_id not in self._running:
                return  # cancelled meanwhile
        if req.deadline is not None and time.monotonic() > req.deadline:
            self._finish(live)
            for i in range(req.n):
                live.on_output(Output(request_id=req.request_id, index=i,
                                      finish_reason="deadline"))
            return
        if FAIL_TOKEN in req.prompt_ids:
            self._finish(live)
            live.on_output(Output(request_id=req.request_id, index=0, finish_reason="error",
                                  error="injected failure"))
            return
        outs = []
        for i in range(req.n):
            if not live.open[i]:
                continue
            j = len(live.generated[i])
            tok = expected_tokens(req.prompt_ids, j + 1, i)[-1]
            live.generated[i].append(tok)
            text = chr(tok) if self.tokenizer is not None else ""
            reason = None
            full = live.texts[i] + text
            for s in req.stop_strings:
                if s in full:
                    text = full[: full.index(s)][len(live.texts[i]):]
                    reason = "stop"
                    break
            live.texts[i] += text
            if reason is None and tok in req.stop_token_ids:
                reason = "stop"
            if reason is None and j + 1 >= req.max_tokens:
                reason = "length"
            lps = ()
            if req.logprobs:
                lps = (TokenLogprob(token_id=tok, logprob=-0.5,
                                    top=tuple((tok + k, -0.5 - k) for k in range(req.logprobs))),)
            if reason is not None:
                live.open[i] = False
            outs.append(Output(request_id=req.request_id, index=i, token_ids=(tok,), text=text,
                               logprobs=lps, finish_reason=reason))
        if not any(live.open):
            self._finish(live)
            last = outs[-1]
            outs[-1] = dataclasses.replace(last, usage=Usage(
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=sum(len(g) for g in live.generated), cached_tokens=0))
        for out in outs:
            live.on_output(out)
