"""Probe: does a `lax.scan` over stacked layer weights cost extra HBM traffic at decode?

Times the weight matmuls of a Llama-3.2-1B-shaped decoder (no attention, M = batch tokens) in
three forms: scan over stacked weights, the same scan unrolled, and a Python loop over separate
per-layer arrays. Prints one JSON line per variant (ms per forward, GB/s of weight reads).

    python benchmarks/layer_loop_probe.py [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

L, D, F = 16, 2048, 8192
NH = 2048 + 2 * 512  # fused q + k + v output width: 32 + 2 x 8 heads of 64


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
    args = p.parse_args()
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
        print(json.dumps({"name": "layer_loop_probe", "variant": name, "batch": args.batch,
                          "ms": round(t * 1e3, 4), "weight_gbps": round(nbytes / t / 1e9, 1),
                          "device": str(jax.devices()[0].device_kind),
                          "jax_version": jax.__version__}), flush=True)


if __name__ == "__main__":
    main()
