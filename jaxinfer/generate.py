"""Offline batched generation and the `python -m jaxinfer.generate` CLI (DESIGN.md section 2).

Prompts of different lengths share one batch: each row gets its own pages, prompts are
prefilled in chunks of at most the largest prefill bucket, and decoding runs `decode_steps`
tokens per dispatch with rows stopping on device. The host dispatches chunk n+1 before it reads
chunk n, so the device never waits for the host between chunks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

import jax
import numpy as np

from jaxinfer import buckets
from jaxinfer.config import EngineConfig
from jaxinfer.errors import CapacityError, JaxinferError, RequestError
from jaxinfer.kv_cache import PagedKVCache, init_cache, pages_needed
from jaxinfer.model_loader import LoadedModel, load_model
from jaxinfer.quant import QUANT_MODES
from jaxinfer.runner import Runner
from jaxinfer.sampling import SamplingParams, row_keys
from jaxinfer.tokenizer import IncrementalDetokenizer
from sharding import multihost
from sharding.data_parallel import ReplicaPageAllocator
from sharding.mesh import fit_engine, make_mesh, parse_mesh

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS) or "length"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Generator:
    """A model, its runner, a KV cache and the page allocator, for offline generation."""

    def __init__(self, loaded: LoadedModel, engine_cfg: EngineConfig, *, mesh) -> None:
        self.loaded = loaded
        self.engine_cfg = engine_cfg
        self.runner = Runner(loaded.cfg, engine_cfg, loaded.graphdef, loaded.params, mesh=mesh)
        self.cache: PagedKVCache = init_cache(loaded.cfg, engine_cfg, self.runner.cache_shardings)
        # Pages per dp replica: slot i takes pages of replica layout.replica_of_slot(i).
        self.allocator = ReplicaPageAllocator(self.runner.layout)

    def _validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        cfg, eng = self.loaded.cfg, self.engine_cfg
        if not prompts:
            raise RequestError("no prompts given")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompts) > eng.batch_buckets[-1]:
            raise RequestError(f"{len(prompts)} prompts exceed the largest batch bucket "
                               f"{eng.batch_buckets[-1]}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RequestError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise RequestError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary "
                                   f"[0, {cfg.vocab_size})")
            total = len(p) + max_new_tokens
            limit = min(eng.max_seq_len, cfg.context_limit)
            if total > limit:
                raise RequestError(f"prompt {i}: {len(p)} prompt + {max_new_tokens} new tokens = "
                                   f"{total} exceeds the context limit {limit}")

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingParams | None = None, seeds: Sequence[int] | None = None
                 ) -> list[Completion]:
        """Generate for every prompt (token ids); returns one Completion per prompt."""
        self._validate(prompts, max_new_tokens)
        n, eng = len(prompts), self.engine_cfg
        sampling = sampling or SamplingParams.make(n)
        keys = row_keys(np.arange(n) if seeds is None else seeds)
        use_sampling = sampling.uses_sampling()
        page_lists = []
        try:
            for i, p in enumerate(prompts):
                page_lists.append(self.allocator.allocate(
                    pages_needed(len(p) + max_new_tokens, eng.page_size),
                    replica=self.runner.layout.replica_of_slot(i)))
        except CapacityError:
            for pages in page_lists:
                self.allocator.free(pages)
            raise
        try:
            return self._run(prompts, page_lists, max_new_tokens, sampling, keys, use_sampling)
        finally:
            for pages in page_lists:
                self.allocator.free(pages)

    def _run(self, prompts, page_lists, max_new_tokens, sampling, keys, use_sampling):
        n, eng, runner = len(prompts), self.engine_cfg, self.runner
        width = buckets.page_bucket(eng, max(len(pl) for pl in page_lists))
        chunk = buckets.max_prefill_chunk(eng)
        lens = [len(p) for p in prompts]
        first = None  # device tokens [B'] sampled after each row's last prompt chunk
        for c in range(0, max(lens), chunk):
            parts = [np.asarray(p[c: c + chunk], np.int32) for p in prompts]
            self.cache, tokens, _ = runner.prefill(
                self.cache, tokens=parts, start=[min(c, ln) for ln in lens],
                block_tables=page_lists, sampling=sampling, keys=keys, width=width)
            ends_here = np.array([c < ln <= c + chunk for ln in lens] +
                                 [False] * (tokens.shape[0] - n))
            first = tokens if first is None else jax.numpy.where(ends_here, tokens, first)
        state = runner.decode_state(tokens=first, seq_lens=np.asarray(lens),
                                    remaining=np.full(n, max_new_tokens - 1),
                                    block_tables=page_lists, sampling=sampling, keys=keys,
                                    width=width)
        out: list[list[int]] = [[int(t)] for t in np.asarray(first)[:n]]
        eos = set(self.loaded.cfg.eos_token_ids)
        done = [out[i][0] in eos or max_new_tokens == 1 for i in range(n)]
        pending = None
        while not all(done):
            self.cache, state, toks = runner.decode(self.cache, state, use_sampling=use_sampling)
            if pending is not None:  # read chunk n-1 while chunk n runs
                self._collect(np.asarray(pending), out, done, eos, max_new_tokens)
            pending = toks
        return [self._completion(p, o, eos, max_new_tokens) for p, o in zip(prompts, out)]

    @staticmethod
    def _collect(toks: np.ndarray, out, done, eos, max_new_tokens) -> None:
        for i in range(len(out)):
            for t in toks[:, i]:
                if done[i]:
                    break
                if t < 0:  # the device stopped the row
                    done[i] = True
                    break
                out[i].append(int(t))
                done[i] = int(t) in eos or len(out[i]) >= max_new_tokens

    def _completion(self, prompt, ids, eos, max_new_tokens) -> Completion:
        reason = "stop" if ids and ids[-1] in eos else "length"
        text = ""
        if self.loaded.tokenizer is not None:
            detok = IncrementalDetokenizer(self.loaded.tokenizer, list(prompt))
            text = detok.add(ids) + detok.flush()
        return Completion(prompt_ids=list(prompt), token_ids=ids, text=text, finish_reason=reason)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.generate",
                                description="Generate text with a Llama-family model.")
    p.add_argument("--model", required=True, help="HF or converted directory, or a preset "
                   "(dummy, llama-3.2-1b-shape, ...)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append",
                     help="comma-separated token ids, used exactly (no BOS); repeatable")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="weights/activations dtype (default bfloat16; float32 on CPU)")
    p.add_argument("--kernels", choices=("reference", "pallas"), default="reference")
    p.add_argument("--quant", choices=QUANT_MODES, default=None,
                   help="quantize the weights at load: int8 (per channel), int8-g64/int8-g128 "
                        "(group-wise), fp8 (W8A8); default: as stored (a checkpoint converted "
                        "with --quant loads quantized)")
    p.add_argument("--mesh", default="dp=1,pp=1,tp=1",
                   help="device mesh, e.g. tp=2 or dp=2,pp=2,tp=2 (sharding/mesh.py)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    multihost.add_distributed_args(p)
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise RequestError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        multihost.initialize_from_args(args)  # before anything touches a device
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        spec = parse_mesh(args.mesh)
        mesh = make_mesh(spec)
        loaded = load_model(args.model, mesh=mesh, dtype=dtype, seed=args.seed,
                            allow_pickle=args.allow_pickle, quant=args.quant)
        tok = loaded.tokenizer
        if args.prompt_ids:
            prompts = [_parse_ids(x) for x in args.prompt_ids]
        elif tok is None:
            raise RequestError(f"{args.model} has no tokenizer files; give --prompt-ids")
        else:
            prompts = [tok.encode(x) for x in (args.prompt or ["Once upon a time"])]
        max_len = args.max_seq_len or min(loaded.cfg.context_limit, 4096)
        longest = max(len(p) for p in prompts) + args.max_new_tokens
        if longest > max_len and args.max_seq_len is None:
            max_len = min(longest, loaded.cfg.context_limit)
        # Each dp replica holds the pages of its own slots (round-robin over the prompts).
        slots_per_replica = -(-len(prompts) // spec.dp)
        num_pages = args.num_pages or (
            spec.dp * slots_per_replica * pages_needed(max_len, args.page_size))
        engine = fit_engine(spec, EngineConfig(page_size=args.page_size, num_pages=num_pages,
                                               max_seq_len=max_len, dtype=dtype,
                                               kernels=args.kernels))
        gen = Generator(loaded, engine, mesh=mesh)
        sampling = SamplingParams.make(len(prompts), temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
        seeds = [args.seed + i for i in range(len(prompts))]
        results = gen.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                               seeds=seeds)
    except JaxinferError as e:
        print(f"jaxinfer.generate: error: {e}", file=sys.stderr)
        return 1
    if not multihost.is_coordinator():  # every process computed the same tokens; one prints
        return 0
    for r in results:
        if args.json:
            print(json.dumps(r.to_json(), ensure_ascii=False))
        else:
            print((tok.decode(r.prompt_ids) if tok else str(r.prompt_ids)) + r.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
