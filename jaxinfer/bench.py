"""`python -m jaxinfer.bench [generate|kernels|serving|loading|quality]`: benchmarks (STYLE.md
rule 17).

`generate` (the default) is the end-to-end generation benchmark below; `kernels` times the Pallas
kernels beside their anchors (`jaxinfer/kernel_bench/`); `serving` drives a running gRPC server
with Poisson arrivals (`serve/loadgen.py`); `loading` measures peak host memory while loading and
converting a synthetic checkpoint (`jaxinfer/load_bench.py`); `quality` measures what a
quantization costs against the unquantized model (`jaxinfer/quality.py`).

One JSON object per measurement on stdout; an aligned summary table on stderr. For each batch
size it submits that many requests of `--prompt-len` random tokens and `--gen-len` greedy tokens
(EOS ignored, as serving benchmarks do) to the engine the server runs (`jaxinfer.engine.llm`:
the same scheduler, runner and programs; its buckets sized so the batch decodes as one bucket
and prefills in one step), once to compile and warm up, then `--repeat` timed times, reporting
the median. Times are read when the engine core reads each step's outputs back; compile time is
its own metric.

Metrics: compile_s, ttft_ms (until every request has its first token), prefill_tok_s,
decode_tok_s (generated tokens after the first over decode time), itl_ms (decode time per
token of a sequence),
tok_s (all generated tokens over the whole call, prefill included: DESIGN.md's anchor
definition), hbm_gbps (weights + KV read per decode step over step time), and roofline_frac
(hbm_gbps over the measured device copy bandwidth, or --peak-gbps; on a mesh, over the
bandwidth of one replica's devices, so tp=4 at 0.7 means each device streams its quarter of the
weights at 70% of its bandwidth; dp replicas, each reading its own copy, count once).

Mesh sweep: `--meshes "tp=1;tp=2;pp=2;dp=2;tp=2,pp=2"` (or a `;` list in `--mesh`) runs the same
model on each layout in turn. One model is loaded per mesh and freed (weights, cache, compiled
steps) before the next, so the sweep needs no more memory than its largest mesh. A mesh that
needs more devices than present, or that the model cannot be split over, gives a `skipped` row
and a notice instead of an error, as does a batch size that dp does not divide. Extra metrics
per mesh: state_gb_per_device (weights + KV cache held by the fullest device, from the arrays'
shards), hbm_in_use_gb (the fullest device's `memory_stats()`, where the backend has them) and
decode_speedup (decode tok/s over the first mesh of the sweep at the same batch). The table
goes to stderr as usual and, when matplotlib is importable, a PNG chart to `--chart`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import buckets
from jaxinfer.config import EngineConfig, ModelConfig, resolve_model
from jaxinfer.engine.llm import LLM
from jaxinfer.errors import ConfigError, JaxinferError
from jaxinfer.hf_cache import add_revision_arg
from jaxinfer.model_loader import load_model_config
from jaxinfer.quant import QUANT_MODES
from jaxinfer.run_info import device_name, git_sha
from sharding import multihost
from sharding.mesh import MeshSpec, check_model_fits, make_mesh, parse_mesh_list

logger = logging.getLogger(__name__)


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


def run_once(llm: LLM, prompts: list[np.ndarray], gen_len: int) -> RunTimes:
    """One timed generation of `gen_len` tokens per prompt (EOS ignored) through the engine:
    ttft when every request has its first token, decode from there to the last token."""
    requests = [llm.request(p, max_tokens=gen_len, ignore_eos=True) for p in prompts]
    first: set[str] = set()
    t_first = [None]
    t0 = time.perf_counter()

    def on_step(step: int, outputs: list) -> None:
        if t_first[0] is None:
            first.update(o.request_id for o in outputs if o.token_ids)
            if len(first) == len(requests):
                t_first[0] = time.perf_counter()

    results = llm.generate(requests, on_step=on_step)
    t2 = time.perf_counter()
    if any(len(s[0].token_ids) != gen_len for s in results):
        raise RuntimeError("a bench request did not generate --gen-len tokens")
    t1 = t_first[0] or t2
    return RunTimes(ttft=t1 - t0, decode=t2 - t1, total=t2 - t0)


def bench_engine_config(args, batches: list[int], dp: int) -> EngineConfig:
    """The engine for a bench run: each batch decodes as one bucket per replica and prefills in
    one step (all its rows, chunks of up to 512 tokens); pages for every sequence."""
    per_replica = sorted({b // dp for b in batches})
    seq = args.prompt_len + args.gen_len
    chunk = min(512, max(16, 1 << (args.prompt_len - 1).bit_length()))
    return EngineConfig(
        page_size=args.page_size, num_pages=per_replica[-1] * -(-seq // args.page_size),
        max_seq_len=seq, dtype=args.dtype, kernels=args.kernels, decode_steps=args.decode_steps,
        batch_buckets=tuple(per_replica), prefill_buckets=(chunk,),
        prefill_rows=tuple(per_replica), max_num_batched_tokens=per_replica[-1] * chunk,
        unroll_layers=args.unroll_layers, speculative_config=args.speculative_config)


def bench_prompts(args, llm: LLM, batch: int, rng) -> list[np.ndarray]:
    """`batch` prompts of --prompt-len tokens: random ids, or windows of --prompt-file. With
    `--prompt-style repeat` a window's first 3/4 is followed by its own first 1/4 again, so the
    text that continues it is a quote of the prompt (as when quoting, summarizing or editing
    it: what n-gram prompt lookup is for)."""
    cfg = llm.core.model_cfg
    if not args.prompt_file:
        return [rng.integers(0, cfg.vocab_size, args.prompt_len).astype(np.int32)
                for _ in range(batch)]
    if llm.tokenizer is None:
        raise ConfigError(f"--prompt-file needs a tokenizer; {args.model} has none")
    ids = np.asarray(llm.tokenizer.encode(Path(args.prompt_file).read_text()), np.int32)
    # Windows a generation apart, so a prompt's continuation is real text of the file.
    stride = args.prompt_len + args.gen_len
    if len(ids) < batch * stride:
        raise ConfigError(f"--prompt-file has {len(ids)} tokens; batch {batch} needs "
                          f"{batch * stride}")
    windows = [ids[i * stride: i * stride + args.prompt_len] for i in range(batch)]
    if args.prompt_style == "repeat":
        quote = args.prompt_len // 4
        body = args.prompt_len - quote
        windows = [np.concatenate([w[:body], w[:quote]]) for w in windows]
    return windows


def _emit(rows: list[dict], row: dict) -> None:
    rows.append(row)
    if multihost.is_coordinator():  # a multi-host run reports once
        print(json.dumps(row), flush=True)


def _skip(rows: list[dict], base: dict, reason: str, batch: int | None = None) -> None:
    """A `skipped` row (no measurement) and a one-line notice."""
    print(f"jaxinfer.bench: skipping mesh {base['mesh']}"
          f"{'' if batch is None else f' batch {batch}'}: {reason}", file=sys.stderr, flush=True)
    _emit(rows, dict(base, batch=batch, metric="skipped", value=None, unit="", reason=reason))


def state_bytes_per_device(trees) -> int:
    """Bytes of the arrays in `trees` held by the fullest local device (from their shards)."""
    per: dict = {}
    for x in jax.tree.leaves(trees):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)


def hbm_in_use(devices) -> int | None:
    """Largest `bytes_in_use` over `devices`; None where the backend keeps no stats (CPU)."""
    used = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "bytes_in_use" in stats:
            used.append(stats["bytes_in_use"])
    return max(used) if used else None


def bench_mesh(args, spec: MeshSpec, batch_sizes: list[int], peak: float | None,
               rows: list[dict]) -> None:
    """Load the model on `spec` (one engine core per dp replica), time every batch size that
    fits, append rows, free it all."""
    dtype = args.dtype
    runnable = [b for b in batch_sizes if b % spec.dp == 0]
    engine = bench_engine_config(args, runnable or [spec.dp], spec.dp)
    base = dict(name="generate", model=args.model, dtype=dtype, quant=args.quant or "none",
                mesh=str(spec), kernels=engine.resolved_kernels(jax.default_backend()),
                unroll_layers=engine.layer_unroll, decode_steps=args.decode_steps,
                prompt_len=args.prompt_len, gen_len=args.gen_len, device=device_name(),
                num_devices=spec.size, jax_version=jax.__version__, git_sha=git_sha(),
                speculative=args.speculative_config,
                prompts=(f"{args.prompt_file} ({args.prompt_style})" if args.prompt_file
                         else "random"))
    for b in batch_sizes:
        if b % spec.dp:
            _skip(rows, base, f"batch {b} is not a multiple of dp={spec.dp}", batch=b)
    if not runnable:
        return
    llm = LLM.load(args.model, engine, mesh=make_mesh(spec), dtype=dtype, seed=0,
                   quant=args.quant)
    cfg = llm.core.model_cfg
    base["quant"] = llm.quant
    wbytes = param_bytes(llm.core.runner.params)
    kv_tok = kv_bytes_per_token(cfg, jnp.dtype(engine.kv_dtype).itemsize)
    rng = np.random.default_rng(0)
    rates = _acceptance_rates(args)
    try:
        for b in runnable:
            prompts = bench_prompts(args, llm, b, rng)
            for rate in rates:
                row = base
                if rate is not None:  # the synthetic proposer's rate is an operand: no compile
                    for c in llm.cores:
                        c.runner.set_proposer_params({"acceptance_rate": np.float32(rate)})
                    row = dict(base, speculative=json.dumps(
                        dict(json.loads(args.speculative_config), acceptance_rate=rate)))
                _bench_batch(args, llm, b, prompts, row, rows, wbytes, kv_tok, peak, spec)
    finally:  # free this mesh's weights, cache and executables before the next mesh loads
        for c in llm.cores:
            for x in jax.tree.leaves((c.runner.cache, c.runner.state, c.runner.params)):
                if not x.is_deleted():
                    x.delete()
        del llm
        jax.clear_caches()
        gc.collect()


def _acceptance_rates(args) -> list[float | None]:
    """--acceptance-rates: the synthetic proposer's rates to sweep ([None]: no sweep)."""
    if not args.acceptance_rates:
        return [None]
    method = json.loads(args.speculative_config or "{}").get("method")
    if method != "synthetic":
        raise ConfigError('--acceptance-rates needs --speculative-config with "method": '
                          '"synthetic"')
    try:
        rates = [float(x) for x in args.acceptance_rates.split(",") if x.strip()]
    except ValueError:
        rates = []
    if not rates or any(not 0.0 <= r <= 1.0 for r in rates):
        raise ConfigError(f"--acceptance-rates must be numbers in [0, 1], got "
                          f"{args.acceptance_rates!r}")
    return rates


def _bench_batch(args, llm: LLM, b: int, prompts, base: dict, rows: list[dict], wbytes: int,
                 kv_tok: int, peak: float | None, spec: MeshSpec) -> None:
    """Time one batch size (a first call, which compiles, then --repeat runs); append rows."""
    c0 = llm.compile_seconds
    t0 = time.perf_counter()
    run_once(llm, prompts, args.gen_len)
    first_call = time.perf_counter() - t0
    compile_s = llm.compile_seconds - c0
    compiles_before = llm.num_compiles
    spec0 = _spec_totals(llm)
    runs = [run_once(llm, prompts, args.gen_len) for _ in range(args.repeat)]
    spec1 = _spec_totals(llm)
    if llm.num_compiles != compiles_before:
        raise RuntimeError("recompiled during timed runs")
    ttft = statistics.median(r.ttft for r in runs)
    dec = statistics.median(r.decode for r in runs)
    total = statistics.median(r.total for r in runs)
    decode_steps = args.gen_len - 1
    step_s = dec / max(decode_steps, 1)
    avg_ctx = args.prompt_len + args.gen_len / 2
    # dp replicas each read their own copy of the weights: count one (the mesh rate).
    gbps = (wbytes + b * avg_ctx * kv_tok) / step_s / 1e9
    state = [(c.runner.params, c.runner.cache) for c in llm.cores]
    metrics = [
        ("compile_s", compile_s, "s"), ("first_call_s", first_call, "s"),
        ("ttft_ms", ttft * 1e3, "ms"),
        ("prefill_tok_s", b * args.prompt_len / ttft, "tok/s"),
        ("decode_tok_s", b * decode_steps / dec, "tok/s"), ("itl_ms", step_s * 1e3, "ms"),
        ("tok_s", b * args.gen_len / total, "tok/s"), ("hbm_gbps", gbps, "GB/s"),
        ("state_gb_per_device", state_bytes_per_device(state) / 1e9, "GB"),
    ]
    if spec1 is not None:
        drafts = spec1[0] - spec0[0]
        proposed, kept = spec1[1] - spec0[1], spec1[2] - spec0[2]
        metrics += [("spec_acceptance_rate", kept / max(proposed, 1), "fraction"),
                    ("spec_mean_accepted_len", kept / max(drafts, 1), "tokens"),
                    ("spec_draft_tokens", proposed, "tokens")]
        per_pos = [a - b0 for a, b0 in zip(spec1[3], spec0[3])]
        metrics += [(f"spec_accepted_pos{i}", v / max(drafts, 1), "fraction")
                    for i, v in enumerate(per_pos)]
        plan = llm.core.scheduler.spec
        if plan.adaptive:  # what adaptive depth chose, and the step costs it chose by
            bucket = buckets.decode_shape(llm.core.engine_cfg, b // len(llm.cores), 1)[0]
            metrics += [(f"spec_steps_k{k}", spec1[4][k] - spec0[4][k], "dispatches")
                        for k in plan.tiers]
            metrics += [(f"spec_cost_ms_k{k}", plan.costs[(k, bucket)] * 1e3, "ms")
                        for k in plan.tiers if (k, bucket) in plan.costs]
            metrics.append(("spec_pool_acceptance", plan.pool_acceptance, "fraction"))
    used = hbm_in_use([d for c in llm.cores for d in c.runner.mesh.local_devices])
    if used is not None:
        metrics.append(("hbm_in_use_gb", used / 1e9, "GB"))
    if peak:
        metrics += [("roofline_frac", gbps / peak / (spec.size // spec.dp), "fraction"),
                    ("copy_gbps", peak, "GB/s")]
    for metric, value, unit in metrics:
        _emit(rows, dict(base, batch=b, metric=metric, value=round(float(value), 4),
                         unit=unit, weight_bytes=wbytes))
    if llm.pages_used():
        raise RuntimeError("pages left in use after a bench run")


def _spec_totals(llm: LLM) -> tuple | None:
    """(drafts, draft tokens, accepted, accepted per position, decode dispatches per tier)
    summed over the cores."""
    if llm.core.spec is None:
        return None
    cs = [c.spec_counts for c in llm.cores]
    per = [sum(c["accepted_per_pos"][i] for c in cs) for i in range(len(cs[0]["accepted_per_pos"]))]
    tiers = {k: sum(c.tier_steps[k] for c in llm.cores) for k in llm.core.tier_steps}
    return (sum(c["num_drafts"] for c in cs), sum(c["num_draft_tokens"] for c in cs),
            sum(c["num_accepted_tokens"] for c in cs), per, tiers)


def bench_generate(args, batch_sizes: list[int]) -> list[dict]:
    """Every mesh of the sweep in turn (a plain run is a sweep of one mesh)."""
    specs = parse_mesh_list(args.meshes or args.mesh)
    cfg = load_model_config(args.model)
    peak = args.peak_gbps or (copy_bandwidth_gbps() if jax.default_backend() == "gpu" else None)
    present = len(jax.devices())
    rows: list[dict] = []
    for spec in specs:
        base = dict(name="generate", model=args.model, dtype=args.dtype, mesh=str(spec),
                    num_devices=spec.size, device=device_name(), jax_version=jax.__version__,
                    git_sha=git_sha())
        if spec.size > present:
            _skip(rows, base, f"needs {spec.size} devices, {present} present")
            continue
        try:
            check_model_fits(spec, cfg)
        except ConfigError as e:
            _skip(rows, base, str(e))
            continue
        bench_mesh(args, spec, batch_sizes, peak, rows)
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """decode_speedup rows: decode tok/s over the first mesh's at the same batch."""
    dec = [r for r in rows if r["metric"] == "decode_tok_s"]
    meshes = list(dict.fromkeys(r["mesh"] for r in dec))
    if len(meshes) < 2:
        return
    baseline = {r["batch"]: r for r in dec if r["mesh"] == meshes[0]}
    for r in dec:
        ref = baseline.get(r["batch"])
        if ref is None or r["mesh"] == meshes[0]:
            continue
        _emit(rows, dict(r, metric="decode_speedup", value=round(r["value"] / ref["value"], 4),
                         unit="x", baseline_mesh=meshes[0]))


def _short_mesh(mesh: str) -> str:
    """"dp=1,pp=2,tp=2" -> "pp=2,tp=2" (axes of size 1 left out)."""
    return ",".join(p for p in mesh.split(",") if not p.endswith("=1")) or "1 device"


def write_chart(rows: list[dict], path: str) -> None:
    """Decode tok/s and TTFT per mesh and batch as a PNG; a one-line notice without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("jaxinfer.bench: matplotlib is not installed; no chart written "
              "(pip install matplotlib)", file=sys.stderr)
        return
    meshes = list(dict.fromkeys(r["mesh"] for r in rows if r["metric"] == "decode_tok_s"))
    batches = sorted({r["batch"] for r in rows if r["metric"] == "decode_tok_s"})
    if not meshes:
        print("jaxinfer.bench: nothing measured; no chart written", file=sys.stderr)
        return
    value = {(r["mesh"], r["batch"], r["metric"]): r["value"] for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(batches)
    for ax, metric, label in ((axes[0], "decode_tok_s", "decode tokens/s"),
                              (axes[1], "ttft_ms", "time to first token (ms)")):
        for j, b in enumerate(batches):
            xs = [i + j * width for i in range(len(meshes))]
            ys = [value.get((m, b, metric), 0.0) for m in meshes]
            ax.bar(xs, ys, width, label=f"batch {b}")
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(meshes))],
                      [_short_mesh(m) for m in meshes], rotation=20)
        ax.set_ylabel(label)
        ax.legend()
    model = rows[0]["model"]
    fig.suptitle(f"{model} on {rows[0]['device']}: mesh sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"jaxinfer.bench: chart written to {path}", file=sys.stderr)


def print_table(rows: list[dict]) -> None:
    order = list(dict.fromkeys(r["mesh"] for r in rows))  # sweep order, not alphabetical
    rate = {}  # an --acceptance-rates sweep: one line per rate
    for r in rows:
        spec = json.loads(r.get("speculative") or "{}")
        rate[id(r)] = spec.get("acceptance_rate") if spec.get("method") == "synthetic" else None
    sweep = any(v is not None for v in rate.values())
    keys = sorted({(r["mesh"], r["batch"], rate[id(r)]) for r in rows},
                  key=lambda k: (order.index(k[0]), -1 if k[1] is None else k[1], k[2] or 0))
    metrics = list(dict.fromkeys(r["metric"] for r in rows if r["metric"] != "skipped"))
    header = ["mesh", "batch"] + (["acceptance"] if sweep else []) + metrics + ["note"]
    table = [header]
    for mesh, b, a in keys:
        sel = [r for r in rows if (r["mesh"], r["batch"], rate[id(r)]) == (mesh, b, a)]
        vals = {r["metric"]: r["value"] for r in sel if r["metric"] != "skipped"}
        note = "; ".join(f"skipped: {r['reason']}" for r in sel if r["metric"] == "skipped")
        table.append([mesh, "-" if b is None else str(b)] + ([str(a)] if sweep else [])
                     + [f"{vals[m]:.4g}" if m in vals else "-" for m in metrics] + [note])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dummy", help="random-weight preset, bundled model (demo), "
                   "model directory or Hugging Face id (ORG/NAME, from the local cache)")
    add_revision_arg(p)
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--kernels", choices=("auto", "reference", "pallas"), default="auto",
                   help="auto: Pallas on GPU, the plain-JAX references elsewhere")
    p.add_argument("--quant", choices=QUANT_MODES, default=None,
                   help="weight quantization (random presets: quantized at load); default: as "
                        "stored")
    p.add_argument("--mesh", default="dp=1,pp=1,tp=1",
                   help="one mesh (dp=D,pp=P,tp=T), or a ';'-separated list to sweep")
    p.add_argument("--meshes", default=None,
                   help='meshes to sweep, e.g. "tp=1;tp=2;pp=2;dp=2;tp=2,pp=2" (overrides --mesh)')
    p.add_argument("--chart", default=None,
                   help="PNG chart of the sweep (default for a sweep of 2+ meshes: "
                        "mesh_sweep_<model>.png); needs matplotlib")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps,
                   help="decode tokens per decode-only dispatch (default: the engine's, "
                   "%(default)s, as served)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding (as generate's); rows add acceptance")
    p.add_argument("--prompt-style", choices=("window", "repeat"), default="window",
                   help="with --prompt-file: plain windows of it, or windows whose last quarter "
                   "repeats their first (the continuation quotes the prompt)")
    p.add_argument("--acceptance-rates", default=None, metavar="A,B,...",
                   help='with a "synthetic" --speculative-config: sweep these acceptance rates '
                   'on the same compiled programs (rows per rate)')
    p.add_argument("--prompt-file", default=None, metavar="TEXT",
                   help="prompts: consecutive --prompt-len token windows of this text file "
                        "(the model's tokenizer), instead of random tokens")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--unroll-layers", type=int, default=None, metavar="N",
                   help="layers per iteration of the layer loop (>= the layer count: fully "
                   "unrolled; default: EngineConfig's, 4 on GPU and 1 elsewhere)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="bandwidth for roofline_frac (default: measured copy bandwidth on GPU)")
    multihost.add_distributed_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "loading":
        from jaxinfer.load_bench import main as loading_main
        return loading_main(argv[1:])
    if argv and argv[0] == "quality":
        from jaxinfer.quality import main as quality_main
        return quality_main(argv[1:])
    if argv and argv[0] == "kernels":
        from jaxinfer.kernel_bench import main as kernels_main
        return kernels_main(argv[1:])
    if argv and argv[0] == "serving":
        # The load generator is a gRPC client of the server and lives beside its protos in
        # serve/ (which jaxinfer never imports): run it as its own program.
        return subprocess.call([sys.executable, "-m", "serve.loadgen", *argv[1:]])
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
        _acceptance_rates(args)  # a bad sweep fails before anything loads
        multihost.initialize_from_args(args)  # before anything touches a device
        args.model = resolve_model(args.model, args.revision)  # an HF id -> its snapshot dir
        rows = bench_generate(args, batch_sizes)
    except JaxinferError as e:
        print(f"jaxinfer.bench: error: {e}", file=sys.stderr)
        return 1
    if not multihost.is_coordinator():
        return 0
    print_table(rows)
    meshes = {r["mesh"] for r in rows}
    chart = args.chart or (f"mesh_sweep_{Path(args.model).name}.png" if len(meshes) > 1 else None)
    if chart:
        write_chart(rows, chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
