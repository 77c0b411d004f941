"""Probe: the serving engine's device programs timed one by one on a tp mesh.

Builds a `ServingRunner` on `tp=T` devices and times each compiled decode (B, W) program (with
the greedy and the full sampler) and prefill (R, T) program: the mean of 5 runs after one
warm-up, one JSON line per program. A slow program under tp stands out here where a served run
only shows slow steps.

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


def _config():
    model = os.environ.get("MODEL", "small")
    if model == "small":
        return replace(PRESETS["llama-3.2-1b-shape"], num_layers=2,
                       vocab_size=int(os.environ.get("VOCAB", "1024")))
    return PRESETS[model]


def _timed_ms(step, state, repeat=5):
    """Mean of `repeat` runs after one warm-up; `step(carry) -> (carry, out)`."""
    state, out = step(state)
    out.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeat):
        state, out = step(state)
        out.block_until_ready()
    return state, (time.perf_counter() - t0) / repeat * 1e3


def main() -> None:
    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    cfg = _config()
    mesh = make_mesh(f"tp={tp}", devices=jax.devices()[:tp])
    graphdef, params = random_params(cfg, mesh, jnp.bfloat16, 0, None)
    eng = EngineConfig(num_pages=int(os.environ.get("PAGES", "4096")), max_seq_len=2048,
                       dtype="bfloat16", decode_steps=16, batch_buckets=(64,),
                       prefill_buckets=(128,), kernels=os.environ.get("KERNELS", "reference"))
    runner = ServingRunner(cfg, eng, graphdef, params, mesh=mesh)
    carry = (runner.init_cache(), runner.init_state())
    keep = os.environ.get("KEYS")
    for key in runner.program_keys():
        if key[0] == "sample" or (keep and str(key) not in keep.split(";")):
            continue
        t0 = time.perf_counter()
        runner.compile(key, *carry)
        compile_s = time.perf_counter() - t0
        ms = {}
        if key[0] == "decode":
            _, b, w = key
            tables = np.arange(b * w, dtype=np.int32).reshape(b, w) % eng.num_pages
            for full in (False, True):
                def step(c, b=b, w=w, tables=tables, full=full):
                    cache, state, out = runner.decode(
                        *c, slots=np.arange(b, dtype=np.int32) % runner.num_slots,
                        positions=np.full(b, w * 16 - 1, np.int32), block_tables=tables,
                        full=full)
                    return (cache, state), out
                carry, ms[str(key + (full,))] = _timed_ms(step, carry)
        else:
            _, rows, t = key
            z = np.zeros(rows, np.int32)
            fp = np.zeros((rows, NUM_FLOAT), np.float32)
            fp[:, [1, 3]] = 1.0
            tables = np.arange(rows * runner.full_width, dtype=np.int32).reshape(rows, -1)

            def step(c, rows=rows, t=t, z=z, fp=fp, tables=tables):
                cache, state, out = runner.prefill(
                    *c, tokens=np.ones((rows, t), np.int32), block_tables=tables % eng.num_pages,
                    slots=np.arange(rows, dtype=np.int32), starts=z + 256, lens=z + t,
                    sample=z + 1, prompt_lens=z + 256 + t,
                    int_params=np.zeros((rows, NUM_INT), np.int32), float_params=fp)
                return (cache, state), out
            carry, ms[str(key)] = _timed_ms(step, carry)
        print(json.dumps({"name": "serving_program_ms", "tp": tp, "key": str(key),
                          "kernels": eng.kernels, "compile_s": round(compile_s, 2),
                          "ms": {k: round(v, 3) for k, v in ms.items()},
                          "device": str(jax.devices()[0].device_kind)}), flush=True)


if __name__ == "__main__":
    main()
