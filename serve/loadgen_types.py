"""What `serve/loadgen.py` and its backends (gRPC there, OpenAI in `serve/loadgen_openai.py`)
share: one request to send, what it measured, the server's summary, and the two failures."""

from __future__ import annotations

import dataclasses


class UsageError(Exception):
    """Bad flags or input file: exit 2."""


class ServerError(Exception):
    """The server cannot be used: exit 1."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request to send: token ids or text, and how many tokens to ask for."""

    max_tokens: int
    token_ids: tuple[int, ...] | None = None
    text: str | None = None
    output_text: str | None = None  # ShareGPT: the reply whose length sets max_tokens


@dataclasses.dataclass
class RequestResult:
    """What one request measured; times are seconds from its send."""

    ok: bool = False
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    # Inter-token latency: a message of k tokens after a gap g adds k gaps of g / k (as
    # SGLang's bench_serving counts a multi-token chunk); `gaps` keeps the raw gaps between
    # messages, which a server decoding several tokens per step sends in bursts.
    itls: list[float] = dataclasses.field(default_factory=list)
    gaps: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclasses.dataclass(frozen=True)
class ServerSummary:
    """The fields of ServerInfo the report needs."""

    model: str
    dtype: str
    quant: str
    mesh: str
    device: str
    vocab_size: int
    special_ids: tuple[int, ...]
    has_tokenizer: bool
    max_seq_len: int
    max_tokens: int
