"""`python -m jaxinfer.bench loading`: peak host memory while loading and converting weights.

    python -m jaxinfer.bench loading --size-gb 2 --tp 1,4 [--dir DIR] [--keep]

Writes a synthetic Llama-shaped Hugging Face checkpoint of about `--size-gb` (random bf16
values, sharded safetensors files, untied head), then measures, each in a fresh child process
on 8 fake CPU devices (`--xla_force_host_platform_device_count=8`):

- `load-hf` at each `--tp`: `checkpoints.load_params` of the Hugging Face directory;
- `convert`: `checkpoints.convert` of it (bf16, streamed to safetensors in our layout);
- `load-converted` at each `--tp`: loading the converted directory.

Memory is the child's own: peak RSS (`VmHWM` of /proc/self/status) above a baseline. The
child first does everything but the work (imports, JAX's start-up, a warm-up allocation, the
config and shardings), then the work once as a warm-up (a first load compiles the small
programs that write the pieces: tens of MB of compiler memory, which would dwarf a
tens-of-MB checkpoint; its ratio is reported as `cold_ratio`), frees it, hands the freed heap
back to the OS (`malloc_trim`, so the measured run cannot reuse it unseen), resets the peak to
the current RSS (writing 5 to /proc/self/clear_refs) and takes that as the baseline, then does
the measured run. For a load the bound compares the peak with the bytes the process keeps: on
CPU all 8 fake devices live in this one process, so it keeps every parameter byte of every
device (replicated parameters once per device): `kept_bytes` is the sum of the addressable
shards' bytes. A real multi-GPU host keeps those bytes in device memory instead, and host
memory holds only the transient part. For conversion the bound compares the peak with the
largest Hugging Face tensor.

One JSON object per measurement on stdout (`ratio`, `bound`, `ok`, ...), a table on stderr.
Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BOUND = 1.25
NOTE_LOAD = ("CPU fake devices: all devices are in this process, so it keeps every parameter "
             "byte (replicas counted); the bound is peak RSS above baseline <= 1.25 x kept")
NOTE_CONVERT = "bound: peak RSS above baseline <= 1.25 x the largest tensor"


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return the new baseline."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:  # no reset possible: the peak so far is the (conservative) baseline
        return _status("VmHWM")


def _release() -> int:
    """After a warm-up run: collect, hand freed heap memory back to the OS (glibc keeps it
    otherwise, and the measured run would reuse it unseen), reset the peak; the baseline."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline then includes freed memory
        pass
    return _reset_peak()


def synthetic_shape(size_bytes: int) -> dict:
    """A Llama `config.json` whose bf16 weights take about `size_bytes`."""
    big = size_bytes >= 1 << 30
    hidden, head_dim, vocab = (2048, 128, 32000) if big else (512, 64, 4096)
    heads = hidden // head_dim
    kv = heads // 2  # tp=4 divides the KV heads at both sizes
    ffn = int(2.75 * hidden) // 128 * 128
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * ffn
                     + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size_bytes - fixed) / per_layer))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def write_synthetic(out: Path, size_bytes: int, *, seed: int = 0) -> dict:
    """A random-valued Hugging Face checkpoint in `out` (streamed, one tensor at a time)."""
    import ml_dtypes

    from checkpoints import llama
    from checkpoints.hf_config import model_config_from_hf
    from checkpoints.safetensors_write import StreamWriter

    config = synthetic_shape(size_bytes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg = model_config_from_hf(out)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    table = llama.tensor_map(cfg)
    tensors = [(name, bf16, m.hf_shape) for m in table for name in m.hf_names()]
    writer = StreamWriter(out, tensors, max_file_bytes=1 << 30)
    rng = np.random.default_rng(seed)
    for name, _, shape in tensors:
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)
        writer.write(name, tuple(slice(None) for _ in shape), x)
    writer.close()
    # The index names the shards like Hugging Face's (open_weights reads either).
    return config


def _mesh(tp: int):
    import jax

    from sharding.mesh import make_mesh

    return make_mesh(f"tp={tp}", devices=jax.devices()[:tp])


def _prepare_load(model_dir: Path, tp: int):
    """Everything but the load itself (imports, config, shardings: done before the baseline)."""
    import jax.numpy as jnp
    import tqdm  # noqa: F401 - imported by the loader; here, before the baseline

    import checkpoints
    from jaxinfer.model_loader import param_shardings

    cfg = checkpoints.load_model_config(model_dir)
    _, shardings = param_shardings(cfg, _mesh(tp), jnp.bfloat16)
    return cfg, shardings


def _load(model_dir: Path, cfg, shardings) -> tuple[int, int]:
    """Load `model_dir`; (bytes kept by this process, largest param bytes)."""
    import jax

    import checkpoints

    params = checkpoints.load_params(model_dir, cfg, dtype="bfloat16", shardings=shardings,
                                     progress=False)
    leaves = jax.block_until_ready(jax.tree.leaves(params))
    kept = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    return kept, max(x.nbytes for x in leaves)


def _largest_hf_tensor(model_dir: Path) -> int:
    from checkpoints.safetensors_io import open_weights

    reader = open_weights(model_dir)
    return max(reader.info(n).nbytes for n in reader.names())


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jnp.ones((1024, 1024)) + 1)  # start the runtime
    model = Path(args.model)
    if args.what == "convert":
        import tqdm  # noqa: F401 - imported by convert; here, before the baseline

        from checkpoints.convert import convert

        work = Path(args.out)

        def run(dst: Path) -> None:
            convert(model, dst, dtype="bfloat16", overwrite=True, show_progress=False)

        base = _reset_peak()
        run(work / "warmup")
        cold = _status("VmHWM") - base
        shutil.rmtree(work / "warmup")
        base = _release()
        t0 = time.perf_counter()
        run(work / "converted")
        seconds = time.perf_counter() - t0
        peak = _status("VmHWM") - base
        ref = _largest_hf_tensor(model)
        return {"peak_above_baseline_bytes": peak, "baseline_rss_bytes": base,
                "largest_tensor_bytes": ref, "ratio": peak / ref, "cold_ratio": cold / ref,
                "seconds": seconds, "note": NOTE_CONVERT}
    cfg, shardings = _prepare_load(model, args.tp)
    base = _reset_peak()
    kept, _ = _load(model, cfg, shardings)  # the warm-up: compiles, allocator pools
    cold = _status("VmHWM") - base
    base = _release()
    t0 = time.perf_counter()
    kept, largest = _load(model, cfg, shardings)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    return {"peak_above_baseline_bytes": peak, "baseline_rss_bytes": base, "kept_bytes": kept,
            "largest_param_bytes": largest, "ratio": peak / kept, "cold_ratio": cold / kept,
            "seconds": seconds, "note": NOTE_LOAD}


def _run_child(what: str, model: Path, *, tp: int = 1, out: Path | None = None) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "jaxinfer.load_bench", "--child", what, "--model", str(model),
           "--tp", str(tp)] + (["--out", str(out)] if out else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{what} tp={tp} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> None:
    header = ["what", "tp", "size_gb", "ref", "ref_gb", "peak_gb", "ratio", "cold", "s", "ok"]
    lines = [header]
    for r in rows:
        ref = r.get("kept_bytes", r.get("largest_tensor_bytes"))
        lines.append([r["what"], str(r.get("tp", "-")), f"{r['size_bytes'] / 1e9:.2f}",
                      "kept" if "kept_bytes" in r else "largest", f"{ref / 1e9:.3f}",
                      f"{r['peak_above_baseline_bytes'] / 1e9:.3f}", f"{r['ratio']:.3f}",
                      f"{r['cold_ratio']:.3f}", f"{r['seconds']:.1f}", str(r["ok"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.bench loading",
                                description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size (default 2)")
    p.add_argument("--tp", default="1,4", help="comma-separated tp sizes to load at")
    p.add_argument("--dir", type=Path, default=None,
                   help="work directory (default: a temporary one, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--skip", default="", help="comma-separated: load-hf,convert,load-converted")
    p.add_argument("--child", choices=("load", "convert"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        args.what, args.tp = args.child, int(args.tp)
        print(json.dumps(child(args)), flush=True)
        return 0
    prog = "jaxinfer.bench loading"
    try:
        tps = [int(x) for x in args.tp.split(",") if x]
        if not tps or min(tps) < 1 or max(tps) > 8:
            raise ValueError
    except ValueError:
        print(f"{prog}: error: --tp must be integers in [1, 8], got {args.tp!r}",
              file=sys.stderr)
        return 2
    if not args.size_gb > 0:
        print(f"{prog}: error: --size-gb must be > 0", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    work = args.dir or Path(tempfile.mkdtemp(prefix="jaxinfer-loading-"))
    rows = []
    try:
        hf = work / "hf"
        write_synthetic(hf, int(args.size_gb * 1e9))
        size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        plan = [("load-hf", "load", hf, tp) for tp in tps if "load-hf" not in skip]
        if "convert" not in skip or "load-converted" not in skip:
            plan.append(("convert", "convert", hf, 1))
        if "load-converted" not in skip:
            plan += [("load-converted", "load", work / "converted", tp) for tp in tps]
        for name, what, model, tp in plan:
            row = {"name": "loading", "what": name, "size_bytes": size,
                   **({"tp": tp} if what == "load" else {})}
            row.update(_run_child(what, model, tp=tp, out=work if what == "convert" else None))
            row["bound"] = BOUND
            row["ok"] = row["ratio"] <= BOUND
            if name == "convert" and "convert" in skip:
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
    except RuntimeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    _table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
