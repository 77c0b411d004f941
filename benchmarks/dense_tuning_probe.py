"""Probe: tile choices of `dense_matmul` (a bf16 layer read in place from its stack) at decode.

For each projection shape of the Llama-3.1-8B layer, whole (tp=1) and per tp=2 shard, and M = 1
and 32, times the kernel with a few `MatmulBlocks` choices beside XLA's dot on an unstacked
weight (the no-copy bar) and reports GB/s of weight read. CUPTI kernel time, median of 20 runs
over 2 weight stacks of 4 layers (so L2 does not hold the layer). One JSON line per timing.

    python benchmarks/dense_tuning_probe.py
    SHAPES=q/2,kv VARIANTS=default,n64_k128_s4_split8 python benchmarks/dense_tuning_probe.py
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from jaxinfer.kernel_bench import base_row, time_kernel
from pallas_kernels import qmatmul as qm

SHAPES = {  # (K, N) of q+k+v (separately: q, kv), o, gate/up, down; whole and tp=2 shards
    "q": (4096, 4096), "q/2": (4096, 2048), "kv": (4096, 1024), "kv/2": (4096, 512),
    "o": (4096, 4096), "o/2": (2048, 4096), "up": (4096, 14336), "up/2": (4096, 7168),
    "down": (14336, 4096), "down/2": (7168, 4096),
}
VARIANTS = {
    "default": qm.DENSE_DEFAULT.small,
    "n64_k128_s4": qm.MatmulBlocks(16, 64, 128, num_stages=4),
    "n64_k256_s3": qm.MatmulBlocks(16, 64, 256, num_stages=3),
    "n128_k256_s3": qm.MatmulBlocks(16, 128, 256, num_stages=3),
    "n32_k256_s4": qm.MatmulBlocks(16, 32, 256, num_stages=4),
    "n64_k128_s4_split2": qm.MatmulBlocks(16, 64, 128, split_k=2, num_stages=4),
    "n64_k128_s4_split4": qm.MatmulBlocks(16, 64, 128, split_k=4, num_stages=4),
    "n64_k128_s4_split8": qm.MatmulBlocks(16, 64, 128, split_k=8, num_stages=4),
    "n128_k128_s4_split2": qm.MatmulBlocks(16, 128, 128, split_k=2, num_stages=4),
    "n64_k512_s2": qm.MatmulBlocks(16, 64, 512, num_stages=2),
    "n128_k64_s6_w8": qm.MatmulBlocks(16, 128, 64, num_stages=6, num_warps=8),
}


def main() -> None:
    layers = 4
    pick = lambda table, env: {k: v for k, v in table.items()  # noqa: E731
                               if k in os.environ.get(env, ",".join(table)).split(",")}
    variants = pick(VARIANTS, "VARIANTS")
    for label, (k, n) in pick(SHAPES, "SHAPES").items():
        for m in (1, 32):
            key = jax.random.key(k * n + m)
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            stacks = [jax.random.normal(jax.random.fold_in(key, i), (layers, k, n),
                                        jnp.bfloat16) * 0.02 for i in range(2)]
            nbytes = k * n * 2
            sets = [(x, s, jnp.int32(i % layers)) for i, s in enumerate(stacks)]
            rows = []
            for name, blocks in variants.items():
                cfg = qm.QMatmulTuning(small=blocks, large=qm.DENSE_DEFAULT.large)
                try:
                    t = time_kernel(lambda x, w, i, cfg=cfg: qm.dense_matmul(
                        x, w, layer=i, cfg=cfg), sets)
                    rows.append((name, t))
                except Exception as e:  # noqa: BLE001 - a variant that does not compile
                    rows.append((name, None))
                    print(json.dumps(base_row(op="dense_tuning", shape=label, m=m, impl=name,
                                              error=str(e)[:200])), flush=True)
            flat = [(x, s[1], None) for x, s, _ in sets]
            rows.append(("xla_dot_unstacked", time_kernel(lambda x, w, _: x @ w, flat)))
            for name, t in rows:
                if t is not None:
                    print(json.dumps(base_row(op="dense_tuning", shape=label, k=k, n=n, m=m,
                                              impl=name, time_us=round(t * 1e6, 2),
                                              gbps=round(nbytes / t / 1e9, 1))), flush=True)


if __name__ == "__main__":
    main()
