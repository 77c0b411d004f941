"""`python -m checkpoints.convert`: a Hugging Face directory -> a jaxinfer checkpoint directory.

    python -m checkpoints.convert --hf-dir DIR|ORG/NAME [--revision REV] --out DIR
        [--dtype bfloat16|float16|float32]
        [--quant none|int8|int8-g64|int8-g128|fp8|int4-g128] [--allow-pickle] [--overwrite] [-v]

Writes the params as safetensors in jaxinfer's own layout (`params/`, one tensor per layer of
each stacked weight, streamed: see `convert`), `jaxinfer_config.json`,
`jaxinfer_checkpoint.json`, and copies the tokenizer files. `--quant` quantizes the weights
offline (`jaxinfer/quant.py`: int8 per output channel, int8 with groups of 64/128 along the
contraction dim, fp8 e4m3 per channel, or int4 with groups of 128 and zero points), from float32 copies of the HF tensors; everything
else is stored in `--dtype`. The mode is recorded in `jaxinfer_checkpoint.json`, and
`jaxinfer.generate --model OUT` loads it quantized.
Everything is validated (config, tensor names, shapes, dtypes) before anything is written.
Errors are one line on stderr, `checkpoints.convert: error: <message>`, with exit status 1 (2 for
usage errors); success prints one summary line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from checkpoints import llama
from checkpoints.dtypes import PARAM_DTYPES, dtype_name, to_numpy_dtype
from checkpoints.hf_config import model_config_from_hf
from checkpoints.load import checkpoint_quant
from checkpoints.orbax_io import (CHECKPOINT_FILE, CONFIG_FILE, PARAMS_DIR, CheckpointInfo,
                                  write_checkpoint_info)
from checkpoints.quantize import layout as quant_layout
from checkpoints.quantize import quantize_host, stored_shapes, stored_table
from checkpoints.safetensors_io import open_weights
from checkpoints.safetensors_write import StreamWriter
from jaxinfer.errors import CheckpointError, JaxinferError
from jaxinfer.hf_cache import add_revision_arg, cached_snapshot, is_repo_id
from jaxinfer.quant import QUANT_MODES, parse_quant

logger = logging.getLogger(__name__)

PROG = "checkpoints.convert"
# Copied as-is so the converted directory is self-contained for tokenization and generation.
COPIED_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of this tool (argparse's default adds the usage).
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}",
                description="Convert a Hugging Face Llama/Mistral/Qwen2 directory to jaxinfer's "
                            "checkpoint format (safetensors in its own layout).")
    p.add_argument("--hf-dir", required=True,
                   help="Hugging Face model directory, or a model id (ORG/NAME) in the local "
                        "Hugging Face cache (nothing is downloaded)")
    add_revision_arg(p, "--hf-dir")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--dtype", default="bfloat16", choices=list(PARAM_DTYPES),
                   help="parameter dtype to store (default: bfloat16)")
    p.add_argument("--quant", default="none", choices=list(QUANT_MODES),
                   help="weight quantization: int8 (per channel), int8-g64/int8-g128 "
                        "(group-wise), fp8 (e4m3 weights, W8A8 at run time), int4-g128 (group-wise "
                        "int4 with zero points); default none")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin pickle weights (unpickling can run code)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing a previous conversion")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def resolve_hf_dir(hf_dir: str | Path, revision: str | None = None) -> Path:
    """`--hf-dir` as a directory: a local one as given (checked later), an ORG/NAME id that is
    no local directory as its snapshot in the Hugging Face cache (`jaxinfer.hf_cache`, as for
    every --model)."""
    if Path(hf_dir).is_dir() or not is_repo_id(str(hf_dir)):
        return Path(hf_dir)
    return cached_snapshot(str(hf_dir), revision)


def _check_dirs(hf_dir: Path, out: Path, *, overwrite: bool) -> None:
    if not hf_dir.is_dir():
        raise CheckpointError(f"--hf-dir {hf_dir}: no such directory")
    if (hf_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"--hf-dir {hf_dir}: already a converted jaxinfer checkpoint")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"--out {out}: exists and is not a directory")
        if out.resolve() == hf_dir.resolve():
            raise CheckpointError(f"--out {out}: must differ from --hf-dir")
        if any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"--out {out}: directory exists and is not empty "
                                  "(pass --overwrite to replace its checkpoint)")


def _clear_previous(out: Path) -> None:
    """Remove what an earlier conversion wrote; leave anything else in the directory alone."""
    # The config marker goes first, so an interrupted overwrite never looks complete.
    for name in (CONFIG_FILE, CHECKPOINT_FILE, *COPIED_FILES):
        (out / name).unlink(missing_ok=True)
    if (out / PARAMS_DIR).exists():
        shutil.rmtree(out / PARAMS_DIR)


def _slabs(m: llama.TensorMap, itemsize: int, chunk_bytes: int):
    """Index tuples that cover one tensor of `m` (its per-layer shape) in pieces of at most
    about `chunk_bytes`, cut along the axis that Hugging Face's row axis becomes, so each piece
    is one contiguous row range of the HF tensor."""
    whole = tuple(slice(0, n) for n in m.shape)
    if not m.shape or math.prod(m.shape) * itemsize <= chunk_bytes:
        yield whole
        return
    k = m.perm.index(0)  # our axis fed by HF axis 0's outermost factor
    step = max(1, chunk_bytes // (math.prod(m.shape) * itemsize // m.shape[k]))
    for a in range(0, m.shape[k], step):
        yield (*whole[:k], slice(a, min(a + step, m.shape[k])), *whole[k + 1:])


def chunk_bytes_for(table: list[llama.TensorMap], itemsize: int) -> int:
    """The piece size conversion works in (`llama.piece_bytes` of the largest tensor)."""
    return llama.piece_bytes(max(math.prod(m.shape) for m in table) * itemsize)


def convert(hf_dir: str | Path, out: str | Path, *, dtype: str = "bfloat16",
            quant: str = "none", allow_pickle: bool = False, overwrite: bool = False,
            show_progress: bool = True) -> str:
    """Convert `hf_dir` into `out`; returns the summary line.

    Streams: each Hugging Face tensor is read in row ranges of at most `chunk_bytes_for`,
    transformed and cast, and written to its place in `out/params/*.safetensors`
    (`StreamWriter`), so host memory holds one piece at a time, never a stacked weight or
    the model. With `quant`, each weight to quantize is read whole, one layer at a time, as
    float32 and quantized on the host CPU device.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    hf_dir, out, dtype = Path(hf_dir), Path(out), dtype_name(dtype)
    spec = parse_quant(quant)
    _check_dirs(hf_dir, out, overwrite=overwrite)
    cfg = model_config_from_hf(hf_dir)
    if checkpoint_quant(hf_dir) != "none":  # AWQ / GPTQ load directly; nothing to convert
        raise CheckpointError(f"{hf_dir} holds int4 (AWQ/GPTQ) weights: load it directly with "
                              "--model, or convert an unquantized checkpoint")
    reader = open_weights(hf_dir, allow_pickle=allow_pickle)
    llama.check_tensors(reader, cfg)  # before anything is written, so errors stay one line
    weights = quant_layout(cfg, quant)
    quant_name = spec.name if spec else "none"
    shapes, fixed = stored_shapes(cfg, quant_name)
    np_dtype = to_numpy_dtype(dtype)
    stored = {m.path: m for m in stored_table(cfg, quant_name)}
    tensors = [(name, fixed.get(p, np_dtype), m.hf_shape)
               for p, m in stored.items() for name in m.hf_names()]
    table = llama.tensor_map(cfg)
    chunk = chunk_bytes_for(table, np_dtype.itemsize)

    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    writer = StreamWriter(out / PARAMS_DIR, tensors)
    with tqdm(total=writer.total_bytes, desc="converting", unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, disable=not show_progress) as bar:
        for m in table:
            for i, hf_name in enumerate(m.hf_names()):
                layer = [str(i)] if m.num_layers is not None else []
                if m.path in weights:  # quantized from float32 on the CPU device
                    b, c = weights[m.path]
                    whole = tuple(slice(None) for _ in m.shape)
                    value = np.asarray(llama.read_region(reader, hf_name, m, whole), np.float32)
                    parts = quantize_host(value, spec, batch=b - len(layer), contract=c)
                    for part, x in parts.items():
                        x = np.asarray(x)
                        writer.write("/".join([*m.path, part, *layer]),
                                     tuple(slice(None) for _ in x.shape), x)
                        bar.update(x.nbytes)
                    continue
                name = "/".join([*m.path, *layer])
                for index in _slabs(m, np_dtype.itemsize, chunk):
                    x = np.asarray(llama.read_region(reader, hf_name, m, index), np_dtype)
                    writer.write(name, index, x)
                    bar.update(x.nbytes)
    writer.close()
    write_checkpoint_info(out, CheckpointInfo(
        dtype=dtype, quant=quant_name, params_format="safetensors",
        params={"/".join(p): list(s) for p, s in shapes.items()}))
    copied = [name for name in COPIED_FILES if (hf_dir / name).is_file()]
    for name in copied:
        shutil.copyfile(hf_dir / name, out / name)
    # Written last: its presence is what marks the directory as a finished conversion.
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2) + "\n", encoding="utf-8")
    logger.info("copied %s", ", ".join(copied) or "no tokenizer files")
    quant_note = f", {quant_name} weights" if spec else ""
    return (f"converted {hf_dir} -> {out}: {cfg.family}, {cfg.num_params / 1e6:.2f}M params, "
            f"{llama.num_hf_tensors(cfg)} tensors, {dtype}{quant_note}, "
            f"{time.perf_counter() - start:.1f}s")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    if args.verbose:  # our own progress only; orbax's INFO logs are a flood
        for name in ("checkpoints", "jaxinfer"):
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        summary = convert(resolve_hf_dir(args.hf_dir, args.revision), args.out,
                          dtype=args.dtype, quant=args.quant, allow_pickle=args.allow_pickle,
                          overwrite=args.overwrite)
    except (JaxinferError, OSError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    import jax

    # Conversion is host work: keep JAX (and its memory preallocation) off any accelerator.
    # Only here, before JAX starts; main() may be called in a process already using a GPU.
    jax.config.update("jax_platforms", "cpu")
    sys.exit(main())
