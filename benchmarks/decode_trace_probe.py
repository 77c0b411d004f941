"""Probe: where a decode token's GPU time goes, per mesh (jax.profiler trace, no extra tools).

For each mesh in MESHES (default "tp=1;tp=2") and batch 1 and 32, runs one warm generation of
the 8B shape (prompt 128, 128 decode tokens, `--kernels pallas`) under `jax.profiler`, reads the
trace back with `jax.profiler.ProfileData` and prints, per GPU, the kernel families taking the
most stream time per decoded token (ms, launches). Streams overlap (async collectives), so the
summed busy time can exceed the wall time.

    MESHES="tp=1;tp=2" python benchmarks/decode_trace_probe.py
"""
import collections
import dataclasses
import json
import os
import re

import jax
import numpy as np

from jaxinfer import bench
from jaxinfer.config import EngineConfig
from jaxinfer.kv_cache import init_cache, pages_needed
from jaxinfer.model_loader import load_model
from jaxinfer.runner import Runner
from sharding.data_parallel import ReplicaPageAllocator
from sharding.mesh import make_mesh, parse_mesh

model = os.environ.get("MODEL", "llama-3.1-8b-shape"); GL = 129; PL = 128
for mesh_text in os.environ.get("MESHES", "tp=1;tp=2").split(";"):
    spec = parse_mesh(mesh_text); mesh = make_mesh(spec)
    loaded = load_model(model, mesh=mesh, dtype="bfloat16")
    cfg = dataclasses.replace(loaded.cfg, eos_token_ids=())
    for b in (1, 32):
        per = pages_needed(PL + GL, 16)
        eng = EngineConfig(page_size=16, num_pages=b * per, max_seq_len=PL + GL, dtype="bfloat16", kernels="pallas", decode_steps=16, batch_buckets=(b,), prefill_buckets=(PL,))
        r = Runner(cfg, eng, loaded.graphdef, loaded.params, mesh=mesh)
        cache = init_cache(cfg, eng, r.cache_shardings)
        alloc = ReplicaPageAllocator(r.layout)
        pl_ = [alloc.allocate(per, replica=r.layout.replica_of_slot(i)) for i in range(b)]
        prompts = [np.arange(PL, dtype=np.int32) + i for i in range(b)]
        cache, t = bench.run_once(r, cache, pl_, prompts, GL, 16)
        cache, t = bench.run_once(r, cache, pl_, prompts, GL, 16)
        import glob
        import shutil
        import tempfile
        tdir = tempfile.mkdtemp()
        jax.profiler.start_trace(tdir)
        cache, t = bench.run_once(r, cache, pl_, prompts, GL, 16)
        jax.profiler.stop_trace()
        f = glob.glob(tdir + "/**/*.xplane.pb", recursive=True)[0]
        d = jax.profiler.ProfileData.from_file(f)
        for plane in d.planes:
            if not plane.name.startswith("/device:GPU:"):
                continue
            lines = {l.name: l for l in plane.lines}
            pick = [n for n in lines if n == "XLA Ops"] or [n for n in lines if "Stream" in n]
            fam = collections.defaultdict(lambda: [0.0, 0])
            for ln in pick:
                for e in lines[ln].events:
                    key = re.sub(r"([._]\d+)+$", "", e.name)[:48]
                    fam[key][0] += e.duration_ns / 1e6; fam[key][1] += 1
            tot = sum(v[0] for v in fam.values())
            top = sorted(fam.items(), key=lambda kv: -kv[1][0])[:12]
            print(json.dumps({"mesh": mesh_text, "batch": b, "plane": plane.name, "lines": list(lines)[:6],
                              "wall_decode_ms_per_tok": round(t.decode / (GL - 1) * 1e3, 3),
                              "busy_ms_per_tok": round(tot / (GL - 1), 3),
                              "top_ms_per_tok": {k: [round(v[0] / (GL - 1), 4), v[1]] for k, v in top}}), flush=True)
            if mesh_text == "tp=1" or plane.name.endswith(":1"):
                pass
        shutil.rmtree(tdir)
        del cache, r
    del loaded
