"""The OpenAI HTTP backend of `python -m jaxinfer.bench serving` (`--backend openai
--base-url http://host:8000`): streaming `/v1/completions`, timed as the gRPC backend times
its stream (`serve/loadgen.py`), so one tool measures us, vLLM or SGLang alike.

Each request streams with `stream_options.include_usage`, so prompt and output token counts
come from the server's final usage chunk. An OpenAI stream does not say how many tokens a
chunk carries, so every chunk with text is one inter-token gap (vLLM's benchmark_serving
counts the same way; a chunk whose tokens have no text yet, which jaxinfer sends and others may
not, counts too); the first one's arrival is the TTFT. Token-id prompts (synthetic ones)
are sent as token-id lists, which vLLM, SGLang and jaxinfer accept; `ignore_eos` is vLLM's
extra parameter (all three accept it). One client (the official `openai` package, needed
only for this backend) carries every request of a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from serve.loadgen_types import Prompt, RequestResult, ServerError, ServerSummary, UsageError


class OpenAIBackend:
    def __init__(self, client, model: str, summary: ServerSummary) -> None:
        self.client, self.model, self.summary = client, model, summary

    @classmethod
    async def connect(cls, args: argparse.Namespace) -> OpenAIBackend:
        """Wait until the server lists its models and answers a one-token completion (a
        server still warming up answers 503); the summary from what it reports."""
        try:
            import openai
        except ImportError:
            raise UsageError("--backend openai needs the openai package "
                             "(pip install openai)") from None
        base = args.base_url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0,
                                    timeout=args.request_timeout)
        deadline = time.monotonic() + args.connect_timeout
        model, why = args.model, ""
        try:
            while True:
                try:
                    models = [m.model_dump() for m in (await client.models.list(timeout=5)).data]
                    model = model or (models[0]["id"] if models else None)
                    if model is None:
                        raise ServerError(f"{base}/models lists no model; give --model")
                    await client.completions.create(model=model, prompt="a", max_tokens=1,
                                                    timeout=30)
                    break
                except openai.APIStatusError as e:
                    if e.status_code not in (502, 503):
                        raise ServerError(f"{base}: HTTP {e.status_code}: "
                                          f"{_message(e.response.text)}") from None
                    why = f"HTTP {e.status_code}"
                except openai.APIConnectionError as e:
                    why = f"{type(e).__name__}: {e}"
                if time.monotonic() > deadline:
                    raise ServerError(f"OpenAI server at {base} is not serving after "
                                      f"{args.connect_timeout:g}s ({why})")
                await asyncio.sleep(0.2)
        except BaseException:
            await client.close()
            raise
        entry = next((m for m in models if m.get("id") == model), {})
        return cls(client, model, _summary(args, model, entry))

    async def send(self, prompt: Prompt, *, ignore_eos: bool, seed: int,
                   timeout_s: float | None) -> RequestResult:
        import openai

        res = RequestResult()
        if prompt.token_ids is not None:
            res.prompt_tokens = len(prompt.token_ids)
        t0 = time.perf_counter()
        last = None
        chunks = 0
        try:
            stream = await self.client.completions.create(
                model=self.model, max_tokens=prompt.max_tokens, temperature=0.0, seed=seed,
                stream=True, stream_options={"include_usage": True}, timeout=timeout_s,
                prompt=list(prompt.token_ids) if prompt.token_ids is not None else prompt.text,
                extra_body={"ignore_eos": True} if ignore_eos else None)
            async for msg in stream:
                now = time.perf_counter()
                for choice in msg.choices or ():
                    if choice.text or not choice.finish_reason:
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itls.append(now - last)
                            res.gaps.append(now - last)
                        last = now
                        chunks += 1
                    if choice.finish_reason:
                        res.finish_reason = str(choice.finish_reason).upper()
                if msg.usage is not None:
                    res.prompt_tokens = msg.usage.prompt_tokens
                    res.output_tokens = msg.usage.completion_tokens
            res.e2e = time.perf_counter() - t0
            res.output_tokens = res.output_tokens or chunks
            res.ok = res.ttft is not None
            if not res.ok:
                res.error = "stream ended without text"
        except openai.APIStatusError as e:
            res.error = f"HTTP {e.status_code}: {_message(e.response.text)}"
        except openai.APIError as e:  # a connection failure, or an error event in the stream
            res.error = f"{type(e).__name__}: {e}"
        return res

    async def close(self) -> None:
        await self.client.close()


def _message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


def _summary(args: argparse.Namespace, model: str, entry: dict) -> ServerSummary:
    """What the report and synthetic prompts need. jaxinfer's /v1/models also reports
    vocab_size and special ids; for other servers `--tokenizer` gives them."""
    vocab = entry.get("vocab_size")
    special = tuple(entry.get("special_token_ids") or ())
    if not isinstance(vocab, int) and args.dataset is None:
        from jaxinfer.errors import JaxinferError
        from jaxinfer.tokenizer import tokenizer_for_model

        if args.tokenizer is None:
            raise UsageError("synthetic prompts need the model's vocabulary, which this server "
                             "does not report: give --tokenizer DIR (or a --dataset)")
        try:
            tok = tokenizer_for_model(args.tokenizer)
        except JaxinferError as e:
            raise UsageError(f"--tokenizer: {e}") from None
        if tok is None:
            raise UsageError(f"--tokenizer {args.tokenizer} has no tokenizer files")
        vocab = tok.vocab_size
        special = tuple(tok.eos_ids) + ((tok.bos_id,) if tok.bos_id is not None else ())
    max_len = entry.get("max_model_len")
    max_len = max_len if isinstance(max_len, int) else 0
    return ServerSummary(model=model, dtype=str(entry.get("dtype") or "unknown"),
                         quant=str(entry.get("quant") or "none"),
                         mesh=str(entry.get("mesh") or "unknown"),
                         device=str(entry.get("device") or "unknown"),
                         vocab_size=int(vocab or 0), special_ids=special,
                         has_tokenizer=True, max_seq_len=max_len,
                         max_tokens=max(max_len - 1, 0))
