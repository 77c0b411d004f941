"""`python -m jaxinfer.bench quality`: what a quantization costs in accuracy, beside its speed.

The same checkpoint is loaded twice, unquantized (as stored, float) and with `--quant MODE`
(and `--cache-dtype` for the KV cache), each as an engine (`jaxinfer.engine.llm.LLM`: the
programs the server runs). Both score the same token sequences, teacher forced, so one early
difference does not change every later comparison; each position's next-token distribution is
compared:

- `top1_agreement`: fraction of positions where the quantized model's argmax equals the
  unquantized one's (its greedy next token).
- `kl_nats`: mean KL(unquantized || quantized) of the next-token distributions, in nats.
- `nll_delta`: mean next-token negative log-likelihood of the text under the quantized model
  minus under the unquantized one (nats per token; positive = worse). The row also carries
  both NLLs.

Texts: `--text-file` cut into windows of `--seq-len` tokens (up to `--windows` of them); by
default the unquantized model's own greedy continuations of a few fixed prompts, so any model
with a tokenizer (or ids only) can be measured without data. `--quant none` compares the model
with itself (agreement 1, KL 0, delta 0 exactly): a check of the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import checkpoints
from jaxinfer.config import (CACHE_DTYPES, QUANT_MODES, EngineConfig, ModelConfig, model_source,
                             resolve_model)
from jaxinfer.engine.llm import LLM
from jaxinfer.errors import ConfigError, JaxinferError
from jaxinfer.hf_cache import add_revision_arg
from jaxinfer.model_loader import load_model, load_model_config
from jaxinfer.run_info import device_name, git_sha
from sharding.mesh import make_mesh

logger = logging.getLogger(__name__)

PROG = "jaxinfer.bench quality"
# Default prompts: code and prose, so the model's own continuations cover what it was trained
# on whichever of the two that is (the bundled demo writes Python; TinyStories models prose).
PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n\n\nclass ", "Once upon a time, there was",
           "The little dog ran to the")


@dataclasses.dataclass(frozen=True)
class Quality:
    """The comparison of two models' next-token log-probabilities over the same positions."""

    top1_agreement: float
    kl_nats: float
    nll_ref: float
    nll_quant: float
    positions: int

    @property
    def nll_delta(self) -> float:
        return self.nll_quant - self.nll_ref


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float logits [..., V] (numpy: host-side scoring)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref_logits: Sequence[np.ndarray], quant_logits: Sequence[np.ndarray],
            targets: Sequence[np.ndarray]) -> Quality:
    """Metrics over every position of every sequence: ref/quant logits [T, V] each, targets
    [T] the next token at each position (what the NLLs score)."""
    agree, kl, nll_r, nll_q, n = 0.0, 0.0, 0.0, 0.0, 0
    for r, q, t in zip(ref_logits, quant_logits, targets, strict=True):
        if r.shape != q.shape or r.shape[0] != len(t):
            raise ValueError(f"logits {r.shape} / {q.shape} do not match {len(t)} targets")
        lr, lq = log_softmax(r), log_softmax(q)
        agree += float(np.sum(r.argmax(-1) == q.argmax(-1)))
        kl += float(np.sum(np.exp(lr) * (lr - lq)))
        idx = np.arange(len(t))
        nll_r -= float(np.sum(lr[idx, t]))
        nll_q -= float(np.sum(lq[idx, t]))
        n += len(t)
    if n == 0:
        raise ValueError("no positions to compare")
    return Quality(top1_agreement=agree / n, kl_nats=kl / n, nll_ref=nll_r / n,
                   nll_quant=nll_q / n, positions=n)


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit code 1, as every other error here."""

    def error(self, message: str):
        self.exit(1, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory, bundled model (demo), "
                   "random preset or Hugging Face id (ORG/NAME); its weights must be float")
    p.add_argument("--quant", required=True, help=f"one of {', '.join(QUANT_MODES)}")
    p.add_argument("--cache-dtype", default=None,
                   help=f"KV cache of the quantized model: one of {', '.join(CACHE_DTYPES)} "
                        "(default: --dtype); the unquantized model keeps --dtype")
    p.add_argument("--dtype", default="float32", help="bfloat16, float16 or float32 (default)")
    p.add_argument("--kernels", default="auto", help="auto, reference or pallas")
    p.add_argument("--text-file", default=None, help="score windows of this text (the model's "
                   "tokenizer); default: the model's greedy continuations of fixed prompts")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per scored sequence")
    p.add_argument("--windows", type=int, default=8, help="--text-file windows at most")
    add_revision_arg(p)
    return p


def _check_args(args) -> None:
    if args.quant not in QUANT_MODES:
        raise ConfigError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {args.quant!r}")
    if args.cache_dtype is not None and args.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"--cache-dtype must be one of {', '.join(CACHE_DTYPES)}, got "
                          f"{args.cache_dtype!r}")
    if args.dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"--dtype must be bfloat16, float16 or float32, got {args.dtype!r}")
    if args.kernels not in ("auto", "reference", "pallas"):
        raise ConfigError(f"--kernels must be auto, reference or pallas, got {args.kernels!r}")
    if args.seq_len < 2 or args.windows < 1:
        raise ConfigError("--seq-len must be >= 2 and --windows >= 1")
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise ConfigError(f"--text-file {args.text_file}: no such file")


def _engine(args, seq_len: int, cache_dtype: str | None) -> EngineConfig:
    chunk = min(512, max(16, 1 << (seq_len - 1).bit_length()))
    return EngineConfig(page_size=16, num_pages=2 * -(-seq_len // 16) + 2, max_seq_len=seq_len,
                        dtype=args.dtype, kernels=args.kernels, cache_dtype=cache_dtype,
                        batch_buckets=(1,), prefill_buckets=(chunk,), prefill_rows=(1,),
                        max_num_batched_tokens=chunk)


def _texts(args, llm, seq_len: int) -> list[list[int]]:
    """Token sequences to score: --text-file windows, or greedy continuations (module doc)."""
    tok = llm.tokenizer
    if args.text_file is not None:
        if tok is None:
            raise ConfigError(f"--text-file needs a tokenizer; {args.model} has none")
        ids = tok.encode(Path(args.text_file).read_text(encoding="utf-8"))
        windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)][:args.windows]
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            raise ConfigError(f"--text-file {args.text_file} has fewer than 2 tokens")
        return windows
    vocab = llm.core.model_cfg.vocab_size
    if tok is not None:
        prompts = [tok.encode(p) for p in PROMPTS]
    else:  # ids only: fixed pseudo-random prompts
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, vocab, 8).tolist() for _ in PROMPTS]
    prompts = [p[:seq_len // 2] for p in prompts]
    requests = [llm.request(p, max_tokens=seq_len - len(p), ignore_eos=True) for p in prompts]
    return [list(p) + out[0].token_ids for p, out in zip(prompts, llm.generate(requests))]


def measure(args) -> tuple[Quality, dict]:
    """Load both models, score the texts; returns the metrics and the rows' shared fields."""
    source = model_source(args.model)
    if not isinstance(source, ModelConfig) and checkpoints.checkpoint_quant(source) != "none":
        raise ConfigError(f"{args.model} holds quantized weights; bench quality compares a "
                          "float checkpoint with its quantization")
    cfg = load_model_config(args.model)
    seq_len = min(args.seq_len, cfg.max_position_embeddings)
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    quant = None if args.quant == "none" else args.quant
    ref = LLM.from_loaded(load_model(args.model, mesh=mesh, dtype=args.dtype),
                          _engine(args, seq_len, None), mesh=mesh)
    texts = _texts(args, ref, seq_len)
    ref_logits = [ref.prompt_logits(t[:-1]) for t in texts]
    del ref
    test = LLM.from_loaded(load_model(args.model, mesh=mesh, dtype=args.dtype, quant=quant),
                           _engine(args, seq_len, args.cache_dtype), mesh=mesh)
    test_logits = [test.prompt_logits(t[:-1]) for t in texts]
    result = compare(ref_logits, test_logits, [np.asarray(t[1:]) for t in texts])
    base = dict(name="quality", model=args.model, dtype=args.dtype, quant=args.quant,
                cache_dtype=args.cache_dtype or args.dtype, mesh="dp=1,pp=1,tp=1", batch=1,
                prompt_len=seq_len, gen_len=0, kernels=args.kernels,
                text=args.text_file or "greedy continuations", sequences=len(texts),
                positions=result.positions, device=device_name(), jax_version=jax.__version__,
                git_sha=git_sha())
    return result, base


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        _check_args(args)
        args.model = resolve_model(args.model, args.revision)
        result, base = measure(args)
    except (JaxinferError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    rows = [dict(base, metric="top1_agreement", value=round(result.top1_agreement, 6),
                 unit="fraction"),
            dict(base, metric="kl_nats", value=round(result.kl_nats, 8), unit="nats"),
            dict(base, metric="nll_delta", value=round(result.nll_delta, 8), unit="nats",
                 nll_ref=round(result.nll_ref, 6), nll_quant=round(result.nll_quant, 6))]
    for row in rows:
        print(json.dumps(row), flush=True)
    for row in rows:
        print(f"{row['quant']:>10}  {row['metric']:>15}  {row['value']:.6g} {row['unit']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
