"""Probe: where a decode token's GPU time goes, per mesh (jax.profiler trace, no extra tools).

For each mesh in MESHES (default "tp=1;tp=2"), weight mode in QUANTS (default "none") and batch
in BATCHES (default "1,32"), runs one warm generation of MODEL (default the 8B shape; prompt
128, 128 decode tokens, DECODE_STEPS tokens per dispatch, default 16, `--kernels pallas`)
under `jax.profiler`, reads the
trace back with `jax.profiler.ProfileData` and prints, per GPU, the kernel families taking the
most stream time per decoded token (ms, launches). Streams overlap (async collectives), so the
summed busy time can exceed the wall time. Also per GPU: the idle time of its busiest stream
and the kernel pairs around the largest gaps (what the stream waited between), and per decode
program the collectives in its compiled HLO (op and shape, with counts).

    MESHES="tp=1;tp=2" python benchmarks/decode_trace_probe.py
    MODEL=llama-3.2-1b-shape MESHES=tp=1 QUANTS=none,int8 BATCHES=1,64 DECODE_STEPS=4 \
        python benchmarks/decode_trace_probe.py
"""
import collections
import glob
import json
import os
import re
import shutil
import tempfile

import jax
import numpy as np

from jaxinfer import bench
from jaxinfer.config import EngineConfig
from jaxinfer.engine.llm import LLM
from jaxinfer.model_loader import load_model
from sharding.mesh import make_mesh, parse_mesh

PROMPT, GEN = 128, 129  # 128 decoded tokens after the prefill's first
STEPS = int(os.environ.get("DECODE_STEPS", "16"))


def _families(plane) -> dict[str, list]:
    """{kernel family (name without numeric suffixes): [total ms, launches]} of one GPU."""
    lines = {line.name: line for line in plane.lines}
    pick = [n for n in lines if n == "XLA Ops"] or [n for n in lines if "Stream" in n]
    fam = collections.defaultdict(lambda: [0.0, 0])
    for name in pick:
        for event in lines[name].events:
            key = _family(event.name)
            fam[key][0] += event.duration_ns / 1e6
            fam[key][1] += 1
    return fam


def _family(name: str) -> str:
    return re.sub(r"([._]\d+)+$", "", name)[:48]


def _gaps(plane, tokens: int) -> dict:
    """Idle time of the GPU's busiest stream, per decoded token, by the kernels around each gap."""
    streams = {line.name: [(e.start_ns, e.end_ns, _family(e.name)) for e in line.events]
               for line in plane.lines if "Stream" in line.name}
    if not streams:
        return {}
    name = max(streams, key=lambda n: len(streams[n]))
    ev = sorted(streams[name])
    pairs = collections.defaultdict(lambda: [0.0, 0])
    idle = 0.0
    for (_, end0, n0), (start1, _, n1) in zip(ev, ev[1:]):
        gap = start1 - end0
        if gap > 2_000:  # launch-to-launch gaps under 2 us are the stream's normal cadence
            idle += gap
            pairs[f"{n0} -> {n1}"][0] += gap / 1e6
            pairs[f"{n0} -> {n1}"][1] += 1
    top = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:8]
    return {"stream": name, "idle_ms_per_tok": round(idle / 1e6 / tokens, 3),
            "span_ms_per_tok": round((ev[-1][1] - ev[0][0]) / 1e6 / tokens, 3),
            "top_gaps_ms_per_tok": {k: [round(v[0] / tokens, 4), v[1]] for k, v in top}}


_COLLECTIVE = re.compile(r"= (\S+|\([^)]*\)) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")


def _collectives(runner) -> dict:
    """{decode program key: {"op shape": count}} from the compiled HLO."""
    out = {}
    for key, exe in runner.compiled.items():
        if key[0] != "decode":
            continue
        text = exe.as_text()
        found = collections.Counter(f"{m[2]} {m[1]}" for m in _COLLECTIVE.finditer(text))
        out[str(key)] = dict(found)
        if os.environ.get("HLO_DIR"):  # the whole optimized program, to read what a kernel is
            os.makedirs(os.environ["HLO_DIR"], exist_ok=True)
            name = "_".join(map(str, key)) + f"_{runner.spec}.txt".replace("=", "").replace(",", "_")
            with open(os.path.join(os.environ["HLO_DIR"], name), "w") as f:
                f.write(text)
    return out


def _trace(llm, prompts):
    """One traced generation -> (timings, GPU planes)."""
    tdir = tempfile.mkdtemp()
    try:
        jax.profiler.start_trace(tdir)
        times = bench.run_once(llm, prompts, GEN)
        jax.profiler.stop_trace()
        [path] = glob.glob(tdir + "/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
        planes = [p for p in data.planes if p.name.startswith("/device:GPU:")]
        return times, planes
    finally:
        shutil.rmtree(tdir)


def _probe(model: str, mesh_text: str, mesh, loaded, quant: str, b: int,
           reduce_dtype: str | None) -> None:
    """Trace one warm generation at batch `b` and print its rows."""
    tokens = GEN - 1
    per = -(-(PROMPT + GEN) // 16)
    eng = EngineConfig(page_size=16, num_pages=b * per, max_seq_len=PROMPT + GEN,
                       dtype="bfloat16", kernels="pallas", decode_steps=STEPS,
                       batch_buckets=(b,), prefill_buckets=(PROMPT,),
                       prefill_rows=(b,), max_num_batched_tokens=b * PROMPT,
                       tp_reduce_dtype=reduce_dtype)
    llm = LLM.from_loaded(loaded, eng, mesh=mesh)
    prompts = [np.arange(PROMPT, dtype=np.int32) + i for i in range(b)]
    for _ in range(2):  # compile, then warm
        bench.run_once(llm, prompts, GEN)
    times, planes = _trace(llm, prompts)
    for plane in planes:
        fam = _families(plane)
        top = sorted(fam.items(), key=lambda kv: -kv[1][0])[:12]
        print(json.dumps({
            "model": model, "quant": quant, "decode_steps": STEPS,
            "mesh": mesh_text, "batch": b, "plane": plane.name,
            "wall_decode_ms_per_tok": round(times.decode / tokens * 1e3, 3),
            "busy_ms_per_tok": round(sum(v[0] for v in fam.values()) / tokens, 3),
            "top_ms_per_tok": {k: [round(v[0] / tokens, 4), v[1]] for k, v in top},
            "gaps": _gaps(plane, tokens),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "tp_reduce_dtype": os.environ.get("TP_REDUCE_DTYPE", "auto"),
        }), flush=True)
    print(json.dumps({"model": model, "quant": quant, "mesh": mesh_text, "batch": b,
                      "collectives": _collectives(llm.core.runner)}), flush=True)


def main() -> None:
    reduce_dtype = os.environ.get("TP_REDUCE_DTYPE")  # e.g. bfloat16: the tp all-reduces'
    model = os.environ.get("MODEL", "llama-3.1-8b-shape")
    batches = [int(b) for b in os.environ.get("BATCHES", "1,32").split(",")]
    for mesh_text in os.environ.get("MESHES", "tp=1;tp=2").split(";"):
        mesh = make_mesh(parse_mesh(mesh_text))
        for quant in os.environ.get("QUANTS", "none").split(","):
            loaded = load_model(model, mesh=mesh, dtype="bfloat16", quant=quant)
            for b in batches:
                _probe(model, mesh_text, mesh, loaded, quant, b, reduce_dtype)
            del loaded


if __name__ == "__main__":
    main()
