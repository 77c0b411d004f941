"""`python -m jaxinfer.bench kernels`: GPU kernel times beside their anchors.

Each kernel family has a module here (`decode.py`, `prefill.py`, `qmatmul.py`) with a
`cases(args) -> Iterator[dict]` generator: for each shape it times our Pallas kernel, the XLA
reference and the anchors DESIGN.md section 4 names (cuDNN, JAX's own Pallas ops), and yields one
row per measurement. This module owns the shared parts: CUPTI timing, row fields, the table.

Times are GPU kernel time from CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`, the median
of `iterations` runs, each over rotating input sets so L2 does not hold them). On CPU (no CUPTI)
the harness falls back to wall-clock medians and marks rows `timer: wall` - useful only to check
that the bench runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import jax

FAMILIES = ("decode", "prefill", "qmatmul")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def time_kernel(fn: Callable, arg_sets: Sequence[tuple], *, iterations: int = 20) -> float:
    """Median GPU time in seconds of `fn(*args)`, cycling through `arg_sets` (several input
    sets, so repeated runs do not just hit L2). `fn` is jitted here and warmed up first."""
    jitted = jax.jit(fn)
    for args in arg_sets:
        jax.block_until_ready(jitted(*args))
    times = []
    if on_gpu():
        from jax.experimental.mosaic.gpu import profiler
        measured = profiler.measure(jitted)
        for i in range(iterations):
            _, ms = measured(*arg_sets[i % len(arg_sets)])
            if ms is None:
                raise RuntimeError("CUPTI saw no kernel launch")
            times.append(ms / 1e3)
    else:
        for i in range(iterations):
            t0 = time.perf_counter()
            jax.block_until_ready(jitted(*arg_sets[i % len(arg_sets)]))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def base_row(**fields) -> dict:
    """Fields every kernel row carries (STYLE.md rule 17)."""
    from jaxinfer.run_info import device_name, git_sha
    return dict(name="kernels", device=device_name(), jax_version=jax.__version__,
                git_sha=git_sha(), timer="cupti" if on_gpu() else "wall", **fields)


def print_table(rows: list[dict]) -> None:
    """One line per (op, impl, shape): time and achieved rate."""
    cols = ["op", "impl", "shape", "us", "rate"]
    table = [cols]
    for r in rows:
        if r.get("metric") != "time_us":
            continue
        rate = next((f"{x['value']:.4g} {x['unit']}" for x in rows
                     if x is not r and x.get("op") == r["op"] and x.get("impl") == r["impl"]
                     and x.get("shape") == r["shape"] and x.get("metric") != "time_us"), "-")
        table.append([r["op"], r["impl"], r["shape"], f"{r['value']:.4g}", rate])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench kernels",
                                description="GPU kernel times beside XLA, cuDNN and JAX's kernels")
    p.add_argument("--ops", default=",".join(FAMILIES),
                   help=f"comma-separated kernel families ({', '.join(FAMILIES)})")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run on CPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ops = [x for x in args.ops.split(",") if x]
    unknown = [x for x in ops if x not in FAMILIES]
    if unknown:
        print(f"jaxinfer.bench kernels: error: unknown ops {unknown} (choose from {FAMILIES})",
              file=sys.stderr)
        return 2
    rows: list[dict] = []
    for op in ops:
        module = importlib.import_module(f"jaxinfer.kernel_bench.{op}")
        cases: Iterator[dict] = module.cases(args)
        for row in cases:
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows)
    return 0
