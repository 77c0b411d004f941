"""Probe: the serving engine's device programs timed one by one on a tp mesh.

Builds a `ServingRunner` on `tp=T` devices and times each compiled decode (B, W) program (with
the greedy and the full sampler) and prefill (R, T) program on padding-free rows, median of 5
after one warm-up, printing one JSON line per program. A slow program under tp stands out here
where a served run only shows slow steps.

    MODEL=llama-3.2-1b-shape KERNELS=pallas KEYS="('prefill', 4, 128)" \
        python benchmarks/serving_programs_probe.py 2      # tp=2

MODEL "small" (default) is the 1B shape with 2 layers and VOCAB (1024) entries, for CPU runs
(8 fake devices).
"""
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import PRESETS, EngineConfig, replace
from jaxinfer.model_loader import random_params
from jaxinfer.serve_steps import NUM_FLOAT, NUM_INT, ServingRunner
from sharding.mesh import make_mesh

tp = int(sys.argv[1]); model = os.environ.get("MODEL", "small")
if model == "small":
    cfg = replace(PRESETS["llama-3.2-1b-shape"], num_layers=2, vocab_size=int(os.environ.get("VOCAB", 1024)))
else:
    cfg = PRESETS[model]
mesh = make_mesh(f"tp={tp}", devices=jax.devices()[:tp])
g, p = random_params(cfg, mesh, jnp.bfloat16, 0, None)
eng = EngineConfig(num_pages=int(os.environ.get("PAGES", 4096)), max_seq_len=2048, dtype="bfloat16", decode_steps=16,
                   batch_buckets=(64,), prefill_buckets=(128,), kernels=os.environ.get("KERNELS", "reference"))
r = ServingRunner(cfg, eng, g, p, mesh=mesh)
cache = r.init_cache(); state = r.init_state()
S = r.num_slots
def tm(f, n=5):
    global cache, state
    out = None
    for i in range(n + 1):
        if i == 1: t = time.perf_counter()
        cache, state, out = f()
        out.block_until_ready()
    return (time.perf_counter() - t) / n * 1e3
res = {}
keep = os.environ.get("KEYS")
for key in r.program_keys():
    if keep and str(key) not in keep.split(";"): continue
    t0 = time.perf_counter(); r.compile(key, cache, state); ct = time.perf_counter() - t0
    if key[0] == "decode":
        _, b, w = key
        bt = np.arange(b * w, dtype=np.int32).reshape(b, w) % eng.num_pages
        for full in (False, True):
            ms = tm(lambda: r.decode(cache, state, slots=np.arange(b, dtype=np.int32) % S, positions=np.full(b, w * 16 - 1, np.int32), block_tables=bt, full=full))
            res[str(key + (full,))] = ms
    elif key[0] == "prefill":
        _, rr, t = key
        z = np.zeros(rr, np.int32)
        fp = np.zeros((rr, NUM_FLOAT), np.float32); fp[:, [1, 3]] = 1.0
        bt = np.arange(rr * r.full_width, dtype=np.int32).reshape(rr, -1) % eng.num_pages
        ms = tm(lambda: r.prefill(cache, state, tokens=np.ones((rr, t), np.int32), block_tables=bt, slots=np.arange(rr, dtype=np.int32), starts=z + 256, lens=z + t, sample=z + 1, prompt_lens=z + 256 + t, int_params=np.zeros((rr, NUM_INT), np.int32), float_params=fp))
        res[str(key)] = ms
    else:
        continue
    if os.environ.get("HLO"): open(os.environ["HLO"] + f"/tp{tp}_{key[0]}_{key[1]}_{key[2]}.txt", "w").write(r.compile(key, cache, state).as_text())
    print(json.dumps({"tp": tp, "key": str(key), "compile_s": round(ct, 2), "ms": {k: round(v, 3) for k, v in res.items() if k.startswith(str(key)[:-1])}, "device": str(jax.devices()[0].device_kind)}), flush=True)
