"""`python -m jaxinfer.bench [generate|kernels|serving]`: benchmarks (STYLE.md rule 17).

`generate` (the default) is the end-to-end generation benchmark below; `kernels` times the Pallas
kernels beside their anchors (`jaxinfer/kernel_bench/`); `serving` drives a running gRPC server
with Poisson arrivals (`serve/loadgen.py`).

One JSON object per measurement on stdout; an aligned summary table on stderr. For each batch
size it runs prefill of `--prompt-len` random tokens and `--gen-len` greedy tokens (EOS ignored,
as serving benchmarks do), once to compile and warm up, then `--repeat` timed times, reporting
the median. Timing uses `block_until_ready`; compile time is its own metric.

Metrics: compile_s, ttft_ms (prefill of the whole batch + first token), prefill_tok_s,
decode_tok_s (generated tokens after the first over decode time), itl_ms (one decode step),
tok_s (all generated tokens over the whole call, prefill included: DESIGN.md's anchor
definition), hbm_gbps (weights + KV read per decode step over step time), and roofline_frac
(hbm_gbps over the measured device copy bandwidth, or --peak-gbps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.errors import JaxinferError
from jaxinfer.kv_cache import PageAllocator, init_cache, pages_needed
from jaxinfer.model_loader import load_model
from jaxinfer.runner import Runner
from jaxinfer.sampling import SamplingParams, row_keys
from sharding.mesh import make_mesh

logger = logging.getLogger(__name__)


def git_sha() -> str:
    """The checkout's commit; JAXINFER_GIT_SHA wins (a copied tree may have no .git)."""
    if os.environ.get("JAXINFER_GIT_SHA"):
        return os.environ["JAXINFER_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', 'unknown')}"


def copy_bandwidth_gbps(nbytes: int = 1 << 30, repeat: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0 + 0.0)
    f(x).block_until_ready()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def param_bytes(params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


@dataclasses.dataclass
class RunTimes:
    ttft: float
    decode: float
    total: float


def run_once(runner: Runner, cache, page_lists, prompts, gen_len: int, steps: int):
    """One timed generation: prefill everything, then decode gen_len - 1 tokens."""
    n = len(prompts)
    sampling = SamplingParams.make(n)
    keys = row_keys(np.arange(n))
    t0 = time.perf_counter()
    chunk = runner.engine_cfg.prefill_buckets[-1]
    width = max(len(p) for p in page_lists)
    first = None
    for c in range(0, len(prompts[0]), chunk):
        cache, first, _ = runner.prefill(cache, tokens=[p[c: c + chunk] for p in prompts],
                                         start=[c] * n, block_tables=page_lists, sampling=sampling,
                                         keys=keys, width=width)
    first.block_until_ready()
    t1 = time.perf_counter()
    state = runner.decode_state(tokens=first, seq_lens=np.full(n, len(prompts[0])),
                                remaining=np.full(n, gen_len - 1), block_tables=page_lists,
                                sampling=sampling, keys=keys, width=width)
    toks = None
    for _ in range(-(-(gen_len - 1) // steps)):
        cache, state, toks = runner.decode(cache, state, num_steps=steps, use_sampling=False)
    if toks is not None:
        toks.block_until_ready()
    t2 = time.perf_counter()
    return cache, RunTimes(ttft=t1 - t0, decode=t2 - t1, total=t2 - t0)


def bench_generate(args, batch_sizes: list[int]) -> list[dict]:
    dtype = args.dtype
    mesh = make_mesh(args.mesh)
    loaded = load_model(args.model, mesh=mesh, dtype=dtype, seed=0)
    cfg = dataclasses.replace(loaded.cfg, eos_token_ids=())  # ignore EOS: fixed-length runs
    seq = args.prompt_len + args.gen_len
    bmax = max(batch_sizes)
    engine = EngineConfig(
        page_size=args.page_size, num_pages=bmax * pages_needed(seq, args.page_size),
        max_seq_len=seq, dtype=dtype, kernels=args.kernels, decode_steps=args.decode_steps,
        batch_buckets=tuple(sorted(set(batch_sizes))),
        prefill_buckets=(min(args.prompt_len, 512),), unroll_layers=args.unroll_layers)
    runner = Runner(cfg, engine, loaded.graphdef, loaded.params, mesh=mesh)
    cache = init_cache(cfg, engine, runner.cache_shardings)
    wbytes = param_bytes(loaded.params)
    kv_tok = kv_bytes_per_token(cfg, jnp.dtype(engine.kv_dtype).itemsize)
    peak = args.peak_gbps or (copy_bandwidth_gbps() if jax.default_backend() == "gpu" else None)
    rng = np.random.default_rng(0)
    base = dict(name="generate", model=args.model, dtype=dtype, quant="none", mesh=args.mesh,
                kernels=args.kernels, unroll_layers=args.unroll_layers, decode_steps=args.decode_steps, prompt_len=args.prompt_len, gen_len=args.gen_len,
                device=device_name(), jax_version=jax.__version__, git_sha=git_sha())
    rows = []
    for b in batch_sizes:
        alloc = PageAllocator(engine.num_pages)
        page_lists = [alloc.allocate(pages_needed(seq, engine.page_size)) for _ in range(b)]
        width = len(page_lists[0])
        prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).astype(np.int32)
                   for _ in range(b)]
        c0 = runner.compile_seconds
        t0 = time.perf_counter()
        cache, _ = run_once(runner, cache, page_lists, prompts, args.gen_len, args.decode_steps)
        first_call = time.perf_counter() - t0
        compile_s = runner.compile_seconds - c0
        compiles_before = runner.num_compiles
        runs = []
        for _ in range(args.repeat):
            cache, t = run_once(runner, cache, page_lists, prompts, args.gen_len, args.decode_steps)
            runs.append(t)
        if runner.num_compiles != compiles_before:
            raise RuntimeError("recompiled during timed runs")
        ttft = statistics.median(r.ttft for r in runs)
        dec = statistics.median(r.decode for r in runs)
        total = statistics.median(r.total for r in runs)
        decode_steps = args.gen_len - 1
        step_s = dec / max(decode_steps, 1)
        avg_ctx = args.prompt_len + args.gen_len / 2
        gbps = (wbytes + b * avg_ctx * kv_tok) / step_s / 1e9
        metrics = [
            ("compile_s", compile_s, "s"), ("first_call_s", first_call, "s"),
            ("ttft_ms", ttft * 1e3, "ms"), ("prefill_tok_s", b * args.prompt_len / ttft, "tok/s"),
            ("decode_tok_s", b * decode_steps / dec, "tok/s"), ("itl_ms", step_s * 1e3, "ms"),
            ("tok_s", b * args.gen_len / total, "tok/s"), ("hbm_gbps", gbps, "GB/s"),
        ]
        if peak:
            metrics += [("roofline_frac", gbps / peak, "fraction"), ("copy_gbps", peak, "GB/s")]
        for metric, value, unit in metrics:
            row = dict(base, batch=b, metric=metric, value=round(float(value), 4), unit=unit,
                       weight_bytes=wbytes)
            rows.append(row)
            print(json.dumps(row), flush=True)
        for pages in page_lists:
            alloc.free(pages)
    return rows


def print_table(rows: list[dict]) -> None:
    keys = sorted({(r["mesh"], r["batch"]) for r in rows})
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    header = ["mesh", "batch"] + metrics
    table = [header]
    for mesh, b in keys:
        vals = {r["metric"]: r["value"] for r in rows if (r["mesh"], r["batch"]) == (mesh, b)}
        table.append([mesh, str(b)] + [f"{vals[m]:.4g}" if m in vals else "-" for m in metrics])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy", help="preset name or model directory")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--kernels", choices=("reference", "pallas"), default="reference")
    p.add_argument("--mesh", default="dp=1,pp=1,tp=1")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=16, help="decode tokens per dispatch")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--unroll-layers", action="store_true",
                   help="unroll the layer loop (static weight slices)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="bandwidth for roofline_frac (default: measured copy bandwidth on GPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "kernels":
        from jaxinfer.kernel_bench import main as kernels_main
        return kernels_main(argv[1:])
    if argv and argv[0] == "serving":
        # The load generator is a gRPC client of the server, so it lives beside the protos.
        from serve.loadgen import main as serving_main
        return serving_main(argv[1:])
    if argv and argv[0] == "generate":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        batch_sizes = [int(x) for x in args.batch.split(",") if x]
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"jaxinfer.bench: error: --batch must be positive integers, got {args.batch!r}",
              file=sys.stderr)
        return 2
    if args.prompt_len < 1 or args.gen_len < 2:
        print("jaxinfer.bench: error: --prompt-len must be >= 1 and --gen-len >= 2", file=sys.stderr)
        return 2
    try:
        rows = bench_generate(args, batch_sizes)
    except JaxinferError as e:
        print(f"jaxinfer.bench: error: {e}", file=sys.stderr)
        return 1
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
