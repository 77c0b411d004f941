"""Host time of one engine step at 64 running sequences, in process (no gRPC): the engine
core's own `StepStats.host_seconds` (schedule + dispatch + apply, the wait for the device left
out), for decode-only steps of 1 and of `decode_steps` tokens. One JSON line per setting.

    python benchmarks/engine_host_probe.py [--model llama-3.2-1b-shape] [--steps 1,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from jaxinfer.config import EngineConfig
from jaxinfer.engine.core import EngineCore
from jaxinfer.engine.request import Request
from jaxinfer.model_loader import load_model
from jaxinfer.run_info import device_name, git_sha
from sharding.mesh import make_mesh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.2-1b-shape")
    p.add_argument("--steps", default="1,8")
    p.add_argument("--rows", type=int, default=64)
    args = p.parse_args()
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    loaded = load_model(args.model, mesh=mesh, dtype=dtype)
    for steps in (int(x) for x in args.steps.split(",")):
        eng = EngineConfig(num_pages=args.rows * 96, max_seq_len=1536, dtype=dtype,
                           batch_buckets=(args.rows,), prefill_buckets=(128,),
                           prefill_rows=(4,), decode_steps=steps)
        core = EngineCore.create(loaded, eng, mesh=mesh)
        rng = np.random.default_rng(0)
        for i in range(args.rows):
            core.add_request(Request(request_id=str(i), max_tokens=1400, ignore_eos=True,
                                     prompt_ids=rng.integers(0, 500, 128).tolist()))
        host, sched, wall = [], [], []
        t_last = time.perf_counter()
        for k in range(40 + 1200 // steps):
            _, st = core.step()
            now = time.perf_counter()
            if st.decode_rows == args.rows and not st.prefill_tokens and k > 30:
                host.append(st.host_seconds)
                sched.append(st.schedule_seconds)
                wall.append(now - t_last)
            t_last = now
            if len(host) >= 100:
                break
        print(json.dumps(dict(
            name="engine_host", model=args.model, dtype=dtype, rows=args.rows,
            decode_steps=steps, host_ms_p50=statistics.median(host) * 1e3,
            host_ms_p90=float(np.percentile(host, 90)) * 1e3,
            schedule_ms_p50=statistics.median(sched) * 1e3,
            step_wall_ms_p50=statistics.median(wall) * 1e3,
            host_ms_per_token_step=statistics.median(host) * 1e3 / steps, samples=len(host),
            device=device_name(), jax_version=jax.__version__, git_sha=git_sha())), flush=True)
        del core
        jax.clear_caches()


if __name__ == "__main__":
    main()
