"""`python -m jaxinfer.bench serving`: a load generator for a running `python -m serve`, or
for any server of the OpenAI HTTP API (`--backend openai --base-url http://host:8000`: ours,
vLLM, SGLang), so one tool compares them.

It drives the server's streaming `jaxinfer.v1.Generation/Generate` RPC (or streaming
`/v1/completions`, `serve/loadgen_openai.py`) the way an online workload would: for each
offered rate (requests/s) it sends `--num-requests` requests whose start times form a Poisson
process (exponential gaps; `inf` sends them all at once), one asyncio task per request over one
channel (or HTTP client), and times every streamed message on arrival.

Prompts are synthetic token ids (lengths fixed, uniform or normal around `--prompt-len`; special
ids avoided; fresh random ids per rate so the prefix cache cannot hit across rates) or come from a
local file (`--dataset`: a JSON list of strings, or JSONL lines with "prompt" and optional
"max_tokens"; a prompt may also be a list of token ids; or a ShareGPT file, a JSON list of
{"conversations": [{"from": "human" | "gpt", "value": ...}, ...]}: as vLLM's benchmark reads
it, the first human turn is the prompt and the gpt turn after it, in tokens of `--tokenizer`
(default: the server's model, when it is a local one), is the output length). Synthetic
requests set `ignore_eos` so every request generates exactly its target length, as serving
benchmarks do.

Per request it records (definitions as in vLLM's benchmark_serving):
  TTFT  send -> first message carrying a token
  ITL   gap between consecutive token-carrying messages (one sample per message: a message that
        carries several tokens counts once, since that is when the client sees them)
  TPOT  (end-to-end - TTFT) / (output tokens - 1), for requests with more than one token
  E2E   send -> end of stream
Per rate: mean/p50/p90/p99 of each, request, input-token and output-token throughput over the
rate's wall time (first send to last completion), and goodput: completed requests per second
that met `--slo-ttft-ms` and `--slo-tpot-ms` (both optional; without either, every completed
request counts).

Output (STYLE.md rule 17): one JSON object per metric per rate on stdout, with the model, dtype,
mesh and device taken from the server's ServerInfo and jax_version/git_sha from this client; an
aligned table on stderr; optionally a PNG of latency against achieved load (`--plot`, needs
matplotlib). The client never initializes a JAX backend: it may share a GPU host with the server.

Exit codes: 0 done; 1 the server cannot be reached, is not serving, or no request completed;
2 bad flags or an unreadable dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PROG = "python -m jaxinfer.bench serving"
PERCENTILES = (50, 90, 99)


# The types both backends share (serve/loadgen_openai.py is the other), re-exported here.
from serve.loadgen_types import (  # noqa: E402
    Prompt,
    RequestResult,
    ServerError,
    ServerSummary,
    UsageError,
)

# -- workload ------------------------------------------------------------------------------------

def parse_rates(text: str) -> list[float]:
    """"1,2,inf" -> [1.0, 2.0, inf]; every rate must be > 0."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            r = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise UsageError(f"--rates: {part!r} is not a number or 'inf'") from None
        if not r > 0 or math.isnan(r):
            raise UsageError(f"--rates: each rate must be > 0 (requests/s) or inf, got {part!r}")
        rates.append(r)
    if not rates:
        raise UsageError("--rates: give at least one rate, e.g. 1,2,4,inf")
    return rates


def sample_lengths(rng: np.random.Generator, mean: int, n: int, dist: str,
                   spread: float) -> np.ndarray:
    """n lengths >= 1: `fixed` all `mean`; `uniform` in [mean(1-spread), mean(1+spread)];
    `normal` with standard deviation spread*mean/2 (so ~95% fall in the uniform range)."""
    if dist == "fixed":
        out = np.full(n, mean)
    elif dist == "uniform":
        lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        out = rng.integers(lo, hi + 1, n)
    elif dist == "normal":
        out = np.rint(rng.normal(mean, spread * mean / 2, n))
    else:
        raise UsageError(f"unknown length distribution {dist!r}")
    return np.maximum(out, 1).astype(np.int64)


def arrival_times(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Send offsets [n] in seconds: a Poisson process of `rate` per second (the first request at
    0), or all zeros for an infinite rate."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic_prompts(rng: np.random.Generator, args: argparse.Namespace,
                      server: ServerSummary) -> list[Prompt]:
    """Random token-id prompts with the requested length distributions, fitted to the server's
    context (a prompt is shortened so that prompt + max_tokens fits max_seq_len)."""
    n = args.num_requests
    gens = sample_lengths(rng, args.gen_len, n, args.gen_len_dist, args.len_spread)
    if server.max_tokens:
        gens = np.minimum(gens, server.max_tokens)
    prompts = sample_lengths(rng, args.prompt_len, n, args.prompt_len_dist, args.len_spread)
    if server.max_seq_len:
        gens = np.minimum(gens, server.max_seq_len - 1)
        prompts = np.clip(prompts, 1, server.max_seq_len - gens)
    allowed = np.setdiff1d(np.arange(server.vocab_size), np.asarray(server.special_ids, int))
    return [Prompt(max_tokens=int(g), token_ids=tuple(int(t) for t in rng.choice(allowed, int(p))))
            for p, g in zip(prompts, gens)]


def load_dataset(path: Path, default_max_tokens: int) -> list[Prompt]:
    """Prompts from a JSON list (strings, or objects like a JSONL line) or a JSONL file of
    {"prompt": str | [int], "max_tokens": int (optional)}."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--dataset {path}: cannot read: {e}") from None
    try:
        data = json.loads(text)
        if isinstance(data, dict):  # JSONL of one line
            data = [data]
        entries = data if isinstance(data, list) else None
        where = [f"item {i}" for i in range(len(data))] if isinstance(data, list) else []
    except json.JSONDecodeError:
        entries, where = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"--dataset {path}: line {i} is not JSON: {e.msg}") from None
            where.append(f"line {i}")
    if entries is None:
        raise UsageError(f"--dataset {path}: expected a JSON list or JSONL lines")
    prompts = []
    for entry, loc in zip(entries, where):
        max_tokens = default_max_tokens
        if isinstance(entry, dict) and "conversations" in entry:
            prompt = _sharegpt(entry["conversations"], default_max_tokens)
            if prompt is not None:
                prompts.append(prompt)
            continue
        if isinstance(entry, dict):
            if "prompt" not in entry:
                raise UsageError(f"--dataset {path}: {loc} has no \"prompt\"")
            max_tokens = entry.get("max_tokens", default_max_tokens)
            entry = entry["prompt"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise UsageError(f"--dataset {path}: {loc}: max_tokens must be a positive integer")
        if isinstance(entry, str) and entry:
            prompts.append(Prompt(max_tokens=max_tokens, text=entry))
        elif (isinstance(entry, list) and entry
              and all(isinstance(t, int) and not isinstance(t, bool) for t in entry)):
            prompts.append(Prompt(max_tokens=max_tokens, token_ids=tuple(entry)))
        else:
            raise UsageError(f"--dataset {path}: {loc}: a prompt must be a non-empty string or "
                             "list of token ids")
    if not prompts:
        raise UsageError(f"--dataset {path}: no prompts")
    return prompts


def _sharegpt(turns, default_max_tokens: int) -> Prompt | None:
    """The first human turn and the gpt reply after it; None when the conversation has no
    such pair (vLLM's benchmark skips those too)."""
    if not isinstance(turns, list):
        return None
    for i, turn in enumerate(turns[:-1]):
        if not isinstance(turn, dict) or turn.get("from") != "human":
            continue
        reply = turns[i + 1]
        text, out = turn.get("value"), reply.get("value") if isinstance(reply, dict) else None
        if (isinstance(text, str) and text and isinstance(out, str) and out
                and reply.get("from") == "gpt"):
            return Prompt(max_tokens=default_max_tokens, text=text, output_text=out)
        return None
    return None


def fit_sharegpt(prompts: list[Prompt], tokenizer, max_seq_len: int) -> list[Prompt]:
    """ShareGPT prompts with max_tokens = the reply's length in tokens (at least 1), dropping
    those whose prompt + reply do not fit the server's context (as vLLM's benchmark drops
    what its model cannot take). Other prompts pass unchanged."""
    out = []
    for p in prompts:
        if p.output_text is None:
            out.append(p)
            continue
        n_out = max(len(tokenizer.encode(p.output_text, add_bos=False)), 1)
        n_in = len(tokenizer.encode(p.text))
        if max_seq_len and n_in + n_out > max_seq_len:
            continue
        out.append(dataclasses.replace(p, max_tokens=n_out))
    return out


# -- metrics -------------------------------------------------------------------------------------

def _stats(name: str, values_s: Sequence[float]) -> list[tuple[str, float, str]]:
    if not values_s:
        return []
    ms = np.asarray(values_s) * 1e3
    out = [(f"{name}_mean", float(ms.mean()), "ms")]
    out += [(f"{name}_p{q}", float(np.percentile(ms, q)), "ms") for q in PERCENTILES]
    return out


def summarize(results: Sequence[RequestResult], duration_s: float, *,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
              peak_in_flight: int = 0) -> list[tuple[str, float, str]]:
    """(metric, value, unit) for one rate. Latency statistics are over completed requests;
    metrics with no samples (e.g. TPOT when every output is one token) are left out."""
    done = [r for r in results if r.ok]
    duration_s = max(duration_s, 1e-9)

    def good(r: RequestResult) -> bool:
        if slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1e3 > slo_ttft_ms):
            return False
        tpot = r.tpot
        return slo_tpot_ms is None or tpot is None or tpot * 1e3 <= slo_tpot_ms

    n_good = sum(good(r) for r in done)
    out_tokens = sum(r.output_tokens for r in done)
    rows = [
        ("completed", len(done), "requests"),
        ("failed", len(results) - len(done), "requests"),
        ("duration_s", duration_s, "s"),
        ("peak_in_flight", peak_in_flight, "requests"),
        ("req_s", len(done) / duration_s, "req/s"),
        ("input_tok_s", sum(r.prompt_tokens for r in done) / duration_s, "tok/s"),
        ("output_tok_s", out_tokens / duration_s, "tok/s"),
        ("goodput_req_s", n_good / duration_s, "req/s"),
        ("slo_attainment", n_good / len(done) if done else 0.0, "fraction"),
    ]
    rows += _stats("ttft_ms", [r.ttft for r in done if r.ttft is not None])
    rows += _stats("tpot_ms", [t for t in (r.tpot for r in done) if t is not None])
    rows += _stats("itl_ms", [g for r in done for g in r.itls])
    rows += _stats("inter_message_ms", [g for r in done for g in r.gaps])
    rows += _stats("e2e_ms", [r.e2e for r in done if r.e2e is not None])
    return rows


# -- gRPC ----------------------------------------------------------------------------------------

def _pb():
    from serve.protos import jaxinfer_v1_pb2, jaxinfer_v1_pb2_grpc
    return jaxinfer_v1_pb2, jaxinfer_v1_pb2_grpc


def _summarize_info(info) -> ServerSummary:
    try:
        engine = json.loads(info.engine_json) if info.engine_json else {}
    except json.JSONDecodeError:
        engine = {}
    m = info.model
    special = list(m.eos_token_ids) + ([m.bos_token_id] if m.HasField("bos_token_id") else [])
    mesh = f"dp={info.mesh.dp},pp={info.mesh.pp},tp={info.mesh.tp}"
    quant = engine.get("quant") if isinstance(engine, dict) else None
    return ServerSummary(
        model=m.name or "unknown", dtype=m.dtype or "unknown", quant=str(quant or "none"),
        mesh=mesh, device=info.mesh.devices[0] if info.mesh.devices else "unknown",
        vocab_size=int(m.vocab_size), special_ids=tuple(special),
        has_tokenizer=bool(m.has_tokenizer), max_seq_len=int(info.limits.max_seq_len),
        max_tokens=int(info.limits.max_tokens))


async def connect(target: str, timeout_s: float, tls_ca: Path | None):
    """Open a channel, wait until the server answers ServerInfo with serving=true.
    Returns (channel, stub, ServerSummary); raises ServerError."""
    import grpc

    pb, pb_grpc = _pb()
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        channel = grpc.aio.secure_channel(target, creds)
    else:
        channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.GenerationStub(channel)
    deadline = time.monotonic() + timeout_s
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
        while True:
            try:
                info = await stub.ServerInfo(pb.ServerInfoRequest(),
                                             timeout=max(1.0, deadline - time.monotonic()))
                if info.serving:
                    return channel, stub, _summarize_info(info)
                why = "still warming up or draining"
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise ServerError(f"ServerInfo at {target} failed: {e.code().name}: "
                                      f"{e.details()}") from None
                why = f"UNAVAILABLE: {e.details()}"
            if time.monotonic() > deadline:
                raise ServerError(f"server at {target} is not serving after {timeout_s:g}s "
                                  f"({why})")
            await asyncio.sleep(0.2)
    except asyncio.TimeoutError:
        await channel.close()
        raise ServerError(f"cannot reach a server at {target} within {timeout_s:g}s") from None
    except ServerError:
        await channel.close()
        raise


def build_request(pb, prompt: Prompt, *, ignore_eos: bool, seed: int):
    sampling = pb.SamplingParams(max_tokens=prompt.max_tokens, ignore_eos=ignore_eos, seed=seed)
    kw = dict(request_id=f"loadgen-{uuid.uuid4().hex[:12]}", sampling=sampling)
    if prompt.token_ids is not None:
        kw["token_ids"] = pb.TokenIds(ids=list(prompt.token_ids))
    else:
        kw["text"] = prompt.text
    return pb.GenerateRequest(**kw)


async def send_one(stub, request, timeout_s: float | None) -> RequestResult:
    """Stream one request, timing each message as it arrives."""
    import grpc

    res = RequestResult()
    if request.WhichOneof("prompt") == "token_ids":
        res.prompt_tokens = len(request.token_ids.ids)  # the final Usage, if any, overrides
    t0 = time.perf_counter()
    last = None
    try:
        async for msg in stub.Generate(request, timeout=timeout_s):
            now = time.perf_counter()
            if msg.token_ids:
                if last is None:
                    res.ttft = now - t0
                else:
                    k = len(msg.token_ids)
                    res.itls.extend([(now - last) / k] * k)
                    res.gaps.append(now - last)
                last = now
                res.output_tokens += len(msg.token_ids)
            if msg.finish_reason:
                res.finish_reason = _pb()[0].FinishReason.Name(msg.finish_reason)
            if msg.HasField("usage"):
                res.prompt_tokens = msg.usage.prompt_tokens
        res.e2e = time.perf_counter() - t0
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "stream ended without tokens"
    except grpc.aio.AioRpcError as e:
        res.error = f"{e.code().name}: {e.details()}"
    return res


class GrpcBackend:
    """The jaxinfer.v1 streaming Generate RPC (the default backend)."""

    def __init__(self, channel, stub, summary: ServerSummary) -> None:
        self.channel, self.stub, self.summary = channel, stub, summary

    @classmethod
    async def connect(cls, args: argparse.Namespace) -> GrpcBackend:
        return cls(*await connect(args.target, args.connect_timeout, args.tls_ca))

    async def send(self, prompt: Prompt, *, ignore_eos: bool, seed: int,
                   timeout_s: float | None) -> RequestResult:
        return await send_one(self.stub, build_request(_pb()[0], prompt, ignore_eos=ignore_eos,
                                                       seed=seed), timeout_s)

    async def close(self) -> None:
        await self.channel.close()


async def run_rate(backend, prompts: Sequence[Prompt], rate: float, rng: np.random.Generator,
                   *, ignore_eos: bool, max_concurrency: int | None,
                   timeout_s: float | None, seed: int) -> tuple[list[RequestResult], float, int]:
    """Send `prompts` at Poisson `rate`; returns (results, wall seconds, peak requests in
    flight). The wall time runs from the first send to the last completion."""
    offsets = arrival_times(rng, len(prompts), rate)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    in_flight = peak = 0

    async def one(i: int, prompt: Prompt) -> RequestResult:
        nonlocal in_flight, peak
        if gate is not None:
            await gate.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await backend.send(prompt, ignore_eos=ignore_eos, seed=seed + i,
                                      timeout_s=timeout_s)
        finally:
            in_flight -= 1
            if gate is not None:
                gate.release()

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i, (offset, prompt) in enumerate(zip(offsets, prompts)):
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, prompt)))
    results = await asyncio.gather(*tasks)
    return list(results), loop.time() - start, peak


# -- report --------------------------------------------------------------------------------------

def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def print_table(rows: list[dict], file=None) -> None:
    """One line per rate (stderr unless `file`): counts, throughput and p50/p99 latencies."""
    file = file or sys.stderr
    cols = ["completed", "failed", "req_s", "output_tok_s", "goodput_req_s", "ttft_ms_p50",
            "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "itl_ms_p99",
            "e2e_ms_p50", "e2e_ms_p99"]
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    table = [["rate"] + cols]
    for rate in rates:
        vals = {r["metric"]: r["value"] for r in rows if r["rate"] == rate}
        table.append([str(rate)] + [f"{vals[c]:.4g}" if c in vals else "-" for c in cols])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)), file=file)


def plot(rows: list[dict], path: Path) -> bool:
    """Latency percentiles against achieved request throughput, one panel per latency; returns
    False (after a one-line notice) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: matplotlib is not installed; skipping --plot {path}", file=sys.stderr)
        return False
    by_rate: dict[str, dict[str, float]] = {}
    for r in rows:
        by_rate.setdefault(r["rate"], {})[r["metric"]] = r["value"]
    points = sorted(by_rate.items(), key=lambda kv: kv[1].get("req_s", 0.0))
    x = [v.get("req_s", math.nan) for _, v in points]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, name in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")):
        for q, style in zip(PERCENTILES, ("o-", "s--", "^:")):
            ax.plot(x, [v.get(f"{name}_p{q}", math.nan) for _, v in points], style, label=f"p{q}")
        for xi, (label, v) in zip(x, points):
            ax.annotate(label, (xi, v.get(f"{name}_p50", math.nan)), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("achieved load (req/s); labels: offered rate")
        ax.set_ylabel(f"{name.split('_')[0].upper()} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    model = rows[0]["model"] if rows else ""
    fig.suptitle(f"jaxinfer serving latency vs load ({model})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- CLI -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("grpc", "openai"), default="grpc",
                   help="grpc: jaxinfer.v1 at --target; openai: streaming /v1/completions at "
                   "--base-url (ours, vLLM, SGLang)")
    p.add_argument("--target", default="127.0.0.1:50051", help="gRPC server host:port")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="OpenAI API server (with --backend openai)")
    p.add_argument("--model", default=None,
                   help="model name for OpenAI requests (default: the first /v1/models lists)")
    p.add_argument("--tokenizer", default=None,
                   help="local model dir whose tokenizer counts ShareGPT replies, and whose "
                   "vocabulary synthetic prompts draw from against an OpenAI server that does "
                   "not report its own (default: the server's model)")
    p.add_argument("--rates", default="1,2,4,inf", help="offered request rates per second")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per rate (default 100; with --dataset, its size)")
    p.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens")
    p.add_argument("--prompt-len-dist", choices=("fixed", "uniform", "normal"), default="fixed")
    p.add_argument("--gen-len", type=int, default=256, help="mean tokens to generate")
    p.add_argument("--gen-len-dist", choices=("fixed", "uniform", "normal"), default="fixed")
    p.add_argument("--len-spread", type=float, default=0.5,
                   help="relative half-width of the uniform/normal length distributions")
    p.add_argument("--dataset", type=Path, default=None,
                   help="JSON list of prompt strings, JSONL with prompt and max_tokens, or a "
                   "ShareGPT JSON file")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens per request (default on)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="cap on requests in flight (default: no cap)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput TTFT bound")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput TPOT bound")
    p.add_argument("--warmup", type=int, default=2,
                   help="requests sent (all at once) before measuring; not reported")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for the server to be reachable and serving")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate: use TLS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None, help="write a latency-vs-load PNG here")
    return p


def check_args(args: argparse.Namespace) -> list[float]:
    rates = parse_rates(args.rates)
    if args.num_requests is not None and args.num_requests < 1:
        raise UsageError("--num-requests must be >= 1")
    if args.prompt_len < 1 or args.gen_len < 1:
        raise UsageError("--prompt-len and --gen-len must be >= 1")
    if not 0 <= args.len_spread < 1:
        raise UsageError("--len-spread must be in [0, 1)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UsageError("--max-concurrency must be >= 1")
    for name in ("slo_ttft_ms", "slo_tpot_ms"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0 or not args.request_timeout > 0 or not args.connect_timeout > 0:
        raise UsageError("--warmup must be >= 0; --request-timeout and --connect-timeout > 0")
    if args.tls_ca is not None and not args.tls_ca.is_file():
        raise UsageError(f"--tls-ca {args.tls_ca}: no such file")
    return rates


async def run(args: argparse.Namespace, rates: list[float], dataset: list[Prompt] | None
              ) -> list[dict]:
    import jax  # the version only; no backend is initialized

    from jaxinfer.run_info import git_sha

    if args.backend == "openai":
        from serve.loadgen_openai import OpenAIBackend

        backend = await OpenAIBackend.connect(args)
    else:
        backend = await GrpcBackend.connect(args)
    server = backend.summary
    try:
        if dataset is not None and any(p.output_text is not None for p in dataset):
            dataset = fit_sharegpt(dataset, _tokenizer(args, server), server.max_seq_len)
            if not dataset:
                raise UsageError(f"--dataset {args.dataset}: no conversation fits the server's "
                                 f"context of {server.max_seq_len} tokens")
        if dataset is not None and not server.has_tokenizer and any(p.text for p in dataset):
            raise ServerError(f"--dataset {args.dataset} has text prompts but the server's model "
                              f"{server.model} has no tokenizer")
        if dataset is None and server.max_seq_len and args.gen_len >= server.max_seq_len:
            raise UsageError(f"--gen-len {args.gen_len} leaves no room for a prompt in the "
                             f"server's max_seq_len {server.max_seq_len}")
        n = args.num_requests or (len(dataset) if dataset is not None else 100)
        args.num_requests = n
        base = dict(name="serving", model=server.model, dtype=server.dtype, quant=server.quant,
                    mesh=server.mesh, batch=args.max_concurrency,
                    prompt_len=None if dataset is not None else args.prompt_len,
                    gen_len=None if dataset is not None else args.gen_len,
                    device=server.device, jax_version=jax.__version__, git_sha=git_sha(),
                    num_requests=n, prompt_len_dist=args.prompt_len_dist,
                    gen_len_dist=args.gen_len_dist,
                    dataset=str(args.dataset) if args.dataset else None,
                    slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
        ignore_eos = args.ignore_eos
        if args.warmup:
            rng = np.random.default_rng(args.seed + 10_000)
            warm = _workload(rng, args, server, dataset)[: args.warmup]
            await asyncio.gather(*(
                backend.send(p, ignore_eos=ignore_eos, seed=args.seed,
                             timeout_s=args.request_timeout) for p in warm))
        rows, first_error = [], ""
        for k, rate in enumerate(rates):
            rng = np.random.default_rng(args.seed + k)
            prompts = _workload(rng, args, server, dataset)
            results, wall, peak = await run_rate(
                backend, prompts, rate, rng, ignore_eos=ignore_eos,
                max_concurrency=args.max_concurrency, timeout_s=args.request_timeout,
                seed=args.seed)
            errors = [r.error for r in results if not r.ok]
            if errors:
                first_error = first_error or errors[0]
                logger.warning("rate %s: %d of %d requests failed, e.g. %s", rate_label(rate),
                               len(errors), len(results), errors[0])
            for metric, value, unit in summarize(results, wall, slo_ttft_ms=args.slo_ttft_ms,
                                                 slo_tpot_ms=args.slo_tpot_ms,
                                                 peak_in_flight=peak):
                row = dict(base, rate=rate_label(rate), metric=metric,
                           value=float(f"{float(value):.6g}"), unit=unit)
                rows.append(row)
                print(json.dumps(row), flush=True)
        if not any(r["metric"] == "completed" and r["value"] > 0 for r in rows):
            raise ServerError(f"no request completed (first error: {first_error})")
        return rows
    finally:
        await backend.close()


def _tokenizer(args: argparse.Namespace, server: ServerSummary):
    """What ShareGPT replies are counted in: --tokenizer, else the server's model when it
    names a local or bundled model (no JAX, no download)."""
    from jaxinfer.errors import JaxinferError
    from jaxinfer.tokenizer import tokenizer_for_model

    name = args.tokenizer or server.model
    try:
        tok = tokenizer_for_model(name)
    except JaxinferError as e:
        raise UsageError(f"a ShareGPT --dataset needs a tokenizer to count its replies: {e}; "
                         "give --tokenizer DIR") from None
    if tok is None:
        raise UsageError(f"{name} has no tokenizer files; give --tokenizer DIR")
    return tok


def _workload(rng: np.random.Generator, args: argparse.Namespace, server: ServerSummary,
              dataset: list[Prompt] | None) -> list[Prompt]:
    """This rate's prompts: fresh synthetic ones, or the dataset shuffled and cycled to N."""
    if dataset is None:
        return synthetic_prompts(rng, args, server)
    order = np.concatenate([rng.permutation(len(dataset))
                            for _ in range(-(-args.num_requests // len(dataset)))])
    return [dataset[i] for i in order[: args.num_requests]]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        rates = check_args(args)
        dataset = load_dataset(args.dataset, args.gen_len) if args.dataset else None
        rows = asyncio.run(run(args, rates, dataset))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print_table(rows)
    if args.plot is not None:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
