"""Probe: does a `lax.scan` over stacked layer weights cost extra HBM traffic at decode?

Times the weight matmuls of a Llama-3.2-1B- or 3.1-8B-shaped decoder (no attention, M = batch
tokens) in three forms: scan over stacked weights, the same scan unrolled, and a Python loop over
separate per-layer arrays. Prints one JSON line per variant (ms per forward, GB/s of weight
reads) and, with --kernels on a GPU, the CUPTI kernel breakdown of each variant (the kernels
that take the most time, by name), which shows whether layer slices are copied out.

    python benchmarks/layer_loop_probe.py [--batch 1] [--shape 8b] [--kernels]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

SHAPES = {  # layers, hidden, ffn, fused q + k + v output width
    "1b": (16, 2048, 8192, 2048 + 2 * 512),
    "8b": (32, 4096, 14336, 4096 + 2 * 1024),
}
L, D, F, NH = SHAPES["1b"]


def _layer(x, w):
    h = x @ w["qkv"]
    x = x + h[:, :D] @ w["o"]
    return x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]


def _stacked(key, dtype):
    ks = jax.random.split(key, 5)
    shapes = {"qkv": (L, D, NH), "o": (L, D, D), "gate": (L, D, F), "up": (L, D, F),
              "down": (L, F, D)}
    return {n: jax.random.normal(k, s, dtype) * 0.02 for k, (n, s) in zip(ks, shapes.items())}


def _time(fn, *args, repeat=50):
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--kernels", action="store_true", help="CUPTI kernel breakdown (GPU)")
    args = p.parse_args()
    global L, D, F, NH
    L, D, F, NH = SHAPES[args.shape]
    dtype = jnp.bfloat16
    stacked = _stacked(jax.random.key(0), dtype)
    per_layer = [{n: w[i] for n, w in stacked.items()} for i in range(L)]
    per_layer = jax.block_until_ready(jax.tree.map(jnp.copy, per_layer))
    x = jax.random.normal(jax.random.key(1), (args.batch, D), dtype)
    nbytes = sum(w.nbytes for w in stacked.values())

    def scan(x, ws, unroll):
        return jax.lax.scan(lambda x, w: (_layer(x, w), None), x, ws, unroll=unroll)[0]

    def loop(x, ws):
        for w in ws:
            x = _layer(x, w)
        return x

    variants = {
        "scan_stacked": (jax.jit(lambda x, w: scan(x, w, 1)), stacked),
        "scan_unrolled": (jax.jit(lambda x, w: scan(x, w, True)), stacked),
        "python_loop_separate": (jax.jit(loop), per_layer),
    }
    for name, (fn, ws) in variants.items():
        t = _time(fn, x, ws)
        row = {"name": "layer_loop_probe", "variant": name, "shape": args.shape,
               "batch": args.batch, "ms": round(t * 1e3, 4),
               "weight_gbps": round(nbytes / t / 1e9, 1),
               "device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
        if args.kernels:
            row["top_kernels_ms"] = _top_kernels(fn, x, ws)
        print(json.dumps(row), flush=True)


def _top_kernels(fn, *args, top=6):
    """{kernel name: total ms in one call} for the kernels taking the most time (CUPTI)."""
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(fn, aggregate=False)(*args)
    total: dict[str, float] = {}
    for name, ms in timings or []:
        key = name[:60]
        total[key] = total.get(key, 0.0) + ms
    ranked = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v, 4) for k, v in ranked} | {"count": len(timings or [])}


if __name__ == "__main__":
    main()
