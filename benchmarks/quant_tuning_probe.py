"""Probe: the decode plans of the weight-streaming kernels on one model's projections.

For each projection of MODEL's layer (default the 1B shape: q, k/v, o, gate/up, down) and
M in MS (default 1, 32, 64), times bf16 (`dense_matmul`, its default plan), int8 per channel,
fp8 W8A8 and int4-g128 with a few decode plans each (`old`: the plan before the kernels got
`dense_matmul`'s narrow-tiles-then-split-K rule; `default`: today's; more programs; more
warps), beside XLA's dot on an unstacked bf16 weight. Weights are stacks read in place at a
layer index, as the model reads them; each timing cycles over enough layers (>= 100 MB) that
L2 does not hold them. CUPTI kernel time (median), one JSON line per timing with GB/s of
weight bytes read.

    python benchmarks/quant_tuning_probe.py
    KINDS=int4 SHAPES=kv,down MS=1 python benchmarks/quant_tuning_probe.py
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from jaxinfer import quant
from jaxinfer.config import preset
from jaxinfer.kernel_bench import base_row, on_gpu, time_kernel
from pallas_kernels import int4_matmul as k4
from pallas_kernels import qmatmul as qm

LAYERS_MAX = int(os.environ.get("LAYERS_MAX", "128"))


def _shapes(model: str) -> dict[str, tuple[int, int]]:
    c = preset(model)
    d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
    return {"q": (d, c.num_heads * h), "kv": (d, c.num_kv_heads * h), "o": (c.num_heads * h, d),
            "up": (d, f), "down": (f, d)}


def _variants(kind: str) -> dict:
    if kind == "bf16":
        return {"default": qm.DENSE_DEFAULT}
    if kind == "int4":
        d = k4.DEFAULT
        return {"old": dataclasses.replace(d, small_m_max=0, min_programs=0), "default": d,
                "p100": dataclasses.replace(d, min_programs=100),
                "w8": dataclasses.replace(d, num_warps=8),
                "st4": dataclasses.replace(d, num_stages=4)}
    d = qm.INT8_DEFAULT if kind == "int8" else qm.FP8_DEFAULT
    return {"old": dataclasses.replace(d, min_programs=0, max_split=2), "default": d,
            "p264": dataclasses.replace(d, min_programs=264),
            "k128": dataclasses.replace(d, small=dataclasses.replace(d.small, block_k=128))}


def _stack(kind: str, k: int, n: int, layers: int, key):
    """(weight operands of a [layers]-stack, bytes per layer) in the layout the model keeps."""
    w = jax.random.normal(key, (layers, k, n), jnp.float32) * 0.02
    if kind == "bf16":
        return (w.astype(jnp.bfloat16),), k * n * 2
    if kind == "int8":
        qa = quant.quantize_int8(w, contract=1, batch=1)
    elif kind == "fp8":
        qa = quant.quantize_fp8(w, contract=1, batch=1)
    else:
        qa = quant.quantize_int4(w, group=128, contract=1, batch=1)
        return (qa.q, qa.scale, quant.matmul_zero(qa)), k * n // 2
    q, s = quant.matmul_operands(qa, contract=1)
    return (q, s), k * n


def _call(kind: str, cfg):
    t8, tf = quant.TRANSPOSED["int8"], quant.TRANSPOSED["fp8"]
    kw = {"cfg": cfg, "interpret": not on_gpu()}  # interpret: a CPU run checks the plumbing
    if kind == "bf16":
        return lambda x, i, w: qm.dense_matmul(x, w, layer=i, **kw)
    if kind == "int8":
        return lambda x, i, q, s: qm.int8_matmul(x, q, s, layer=i, transposed=t8, **kw)
    if kind == "fp8":
        return lambda x, i, q, s: qm.fp8_matmul(x, q, s, layer=i, transposed=tf, **kw)
    return lambda x, i, q, s, z: k4.int4_matmul(x, q, s, z, group=128, layer=i, **kw)


def main() -> None:
    model = os.environ.get("MODEL", "llama-3.2-1b-shape")
    shapes = _shapes(model)
    pick = os.environ.get("SHAPES", ",".join(shapes)).split(",")
    kinds = os.environ.get("KINDS", "bf16,int8,fp8,int4").split(",")
    ms = [int(m) for m in os.environ.get("MS", "1,32,64").split(",")]
    for label in pick:
        k, n = shapes[label]
        for kind in kinds:
            per_layer = k * n * {"bf16": 2, "int8": 1, "fp8": 1, "int4": 0.5}[kind]
            layers = int(min(LAYERS_MAX, max(4, -(-100e6 // per_layer))))
            weights, nbytes = _stack(kind, k, n, layers, jax.random.key(k * n))
            for m in ms:
                x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
                sets = [(x, jnp.int32(i), *weights) for i in range(layers)]
                for name, cfg in _variants(kind).items():
                    row = {"op": "decode_plan", "model": model, "shape": label, "k": k, "n": n,
                           "m": m, "kind": kind, "impl": name}
                    try:
                        t = time_kernel(_call(kind, cfg), sets, iterations=max(20, layers))
                    except Exception as e:  # noqa: BLE001 - a variant that does not compile
                        print(json.dumps(base_row(**row, error=str(e)[:300])), flush=True)
                        continue
                    print(json.dumps(base_row(**row, time_us=round(t * 1e6, 2),
                                              gbps=round(nbytes / t / 1e9, 1))), flush=True)
            del weights
        w = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(2)]
        for m in ms:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            t = time_kernel(lambda x, w: x @ w, [(x, wi) for wi in w])
            print(json.dumps(base_row(op="decode_plan", model=model, shape=label, k=k, n=n, m=m,
                                      kind="bf16", impl="xla_dot_unstacked",
                                      time_us=round(t * 1e6, 2),
                                      gbps=round(k * n * 2 / t / 1e9, 1))), flush=True)


if __name__ == "__main__":
    main()
