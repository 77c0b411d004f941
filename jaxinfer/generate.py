"""`python -m jaxinfer.generate`: offline generation from the command line (DESIGN.md section 2).

It drives the same engine as the server (`jaxinfer.engine.llm.LLM`: scheduler, runner,
sampler and output processor), so penalties, logprobs, n, stop strings and seeds work here
exactly as served. Prompts of different lengths share the batch (up to 64 sequences per
replica decode together; more wait their turn); the KV pool holds that many at full length
unless `--num-pages` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import jax

from jaxinfer.config import DEFAULT_MODEL, EngineConfig, resolve_model
from jaxinfer.engine.llm import LLM
from jaxinfer.engine.request import SamplingOptions
from jaxinfer.errors import JaxinferError, RequestError
from jaxinfer.hf_cache import add_revision_arg
from jaxinfer.model_loader import load_model_config
from jaxinfer.tokenizer import tokenizer_for_model
from jaxinfer.quant import QUANT_MODES
from sharding import multihost
from sharding.mesh import make_mesh, parse_mesh

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxinfer.generate",
                                description="Generate text with a Llama-family model.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF or converted directory, a Hugging Face id (ORG/NAME, from the local "
                   "cache), a bundled model (demo: the default) or a random-weight preset "
                   "(dummy, llama-3.2-1b-shape, ...)")
    add_revision_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append",
                     help="comma-separated token ids, used exactly (no BOS); repeatable")
    src.add_argument("--messages", default=None, metavar="JSON",
                     help='a conversation for the chat template, e.g. \'[{"role": "user", '
                     '"content": "Hi"}]\' (implies --chat)')
    p.add_argument("--chat", action="store_true",
                   help="render each --prompt as one user message through the model's chat "
                   "template (tokenized without a second BOS)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja chat template that replaces the model's own")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--logprobs", type=int, default=0, metavar="N",
                   help="top logprobs per generated token (in --json output)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); the text ends before it")
    p.add_argument("--stop-token-ids", default="", help="comma-separated stop token ids")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed of prompt i: seed + i * n (and the random presets' "
                   "weights seed)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="weights/activations dtype (default bfloat16; float32 on CPU)")
    p.add_argument("--kernels", choices=("auto", "reference", "pallas"), default="auto",
                   help="auto: Pallas on GPU, the plain-JAX references elsewhere")
    p.add_argument("--quant", choices=QUANT_MODES, default=None,
                   help="quantize the weights at load: int8 (per channel), int8-g64/int8-g128 "
                        "(group-wise), fp8 (W8A8), int4-g128 (group-wise int4); default: as stored "
                        "(a checkpoint converted with --quant loads quantized)")
    p.add_argument("--mesh", default="dp=1,pp=1,tp=1",
                   help="device mesh, e.g. tp=2 or dp=2,pp=2,tp=2 (sharding/mesh.py)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pages (default: every prompt at full length)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps,
                   help="decode tokens per dispatch (default %(default)s)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys: {"method": "draft_model", '
                        '"model": DIR, "num_speculative_tokens": K}, {"method": "ngram", '
                        '"num_speculative_tokens": K, "prompt_lookup_min": 1, '
                        '"prompt_lookup_max": 4}, "layer_skip" (num_layers) or '
                        '"package.module:factory"; "adaptive": true picks k per step '
                        '(docs/decoding.md)')
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
        args.model = resolve_model(args.model, args.revision)  # an HF id -> its snapshot dir
        if args.n < 1:
            raise RequestError(f"--n must be >= 1, got {args.n}")
        if args.max_new_tokens < 1:
            raise RequestError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        spec = parse_mesh(args.mesh)
        mesh = make_mesh(spec)
        cfg = load_model_config(args.model)
        tok = tokenizer_for_model(args.model)
        if args.prompt_ids:
            if args.chat or args.chat_template:
                raise RequestError("--chat takes --prompt or --messages text, not --prompt-ids")
            prompts = [_parse_ids(x) for x in args.prompt_ids]
        elif tok is None:
            raise RequestError(f"{args.model} has no tokenizer files; give --prompt-ids")
        elif args.chat or args.messages is not None or args.chat_template:
            prompts = _chat_prompts(args, tok)
        else:
            prompts = [tok.encode(x) for x in (args.prompt or ["Once upon a time"])]
        engine = _engine_config(args, dtype, cfg, prompts, spec.dp)
        llm = LLM.load(args.model, engine, mesh=mesh, dtype=dtype, seed=args.seed,
                       quant=args.quant, allow_pickle=args.allow_pickle)
        stop_ids = tuple(_parse_ids(args.stop_token_ids)) if args.stop_token_ids else ()
        requests = []
        for i, p in enumerate(prompts):
            sampling = SamplingOptions(
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, seed=args.seed + i * args.n,
                repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
            requests.append(llm.request(p, max_tokens=args.max_new_tokens, sampling=sampling,
                                        stop_strings=tuple(args.stop), stop_token_ids=stop_ids,
                                        ignore_eos=args.ignore_eos, n=args.n,
                                        logprobs=args.logprobs))
        results = llm.generate(requests)
    except JaxinferError as e:
        print(f"jaxinfer.generate: error: {e}", file=sys.stderr)
        return 1
    if not multihost.is_coordinator():  # every process computed the same tokens; one prints
        return 0
    for samples in results:
        for r in samples:
            if args.json:
                print(json.dumps(r.to_json(), ensure_ascii=False))
            else:
                print((tok.decode(r.prompt_ids) if tok else str(r.prompt_ids)) + r.text)
    return 0


def _chat_prompts(args, tok) -> list[list[int]]:
    """Token ids of each conversation rendered by the chat template (BOS as the template
    writes it, never added again)."""
    from jaxinfer.chat_template import NO_TEMPLATE, chat_template_for_model

    template = chat_template_for_model(args.model, args.chat_template)
    if template is None:
        raise RequestError(f"--chat: {NO_TEMPLATE}")
    if args.messages is not None:
        try:
            messages = json.loads(args.messages)
        except ValueError as e:
            raise RequestError(f"--messages is not valid JSON: {e}") from None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise RequestError('--messages must be a JSON list of {"role": ..., "content": ...} '
                               "objects")
        conversations = [messages]
    else:
        conversations = [[{"role": "user", "content": x}]
                         for x in (args.prompt or ["Once upon a time"])]
    return [tok.encode(template.render(c), add_bos=False) for c in conversations]


def _engine_config(args, dtype: str, cfg, prompts: list[list[int]], dp: int) -> EngineConfig:
    """Buckets for this batch: every sequence of a replica decodes in one batch (up to 64; more
    wait their turn), prompts prefill in chunks of up to 512 tokens, many rows at once; pages
    for every sequence at full length."""
    longest = max(len(p) for p in prompts)
    max_len = args.max_seq_len or min(cfg.context_limit, 4096)
    if longest + args.max_new_tokens > max_len and args.max_seq_len is None:
        max_len = min(longest + args.max_new_tokens, cfg.context_limit)
    per_replica = -(-len(prompts) * max(args.n, 1) // dp)
    batch = min(64, 1 << (per_replica - 1).bit_length())
    chunk = min(512, max(16, 1 << (longest - 1).bit_length()))
    pages_per_seq = -(-max_len // args.page_size)
    return EngineConfig(
        page_size=args.page_size, num_pages=args.num_pages or batch * pages_per_seq,
        max_seq_len=max_len, dtype=dtype, kernels=args.kernels, decode_steps=args.decode_steps,
        batch_buckets=(batch,), prefill_buckets=(chunk,), prefill_rows=(batch,),
        max_num_batched_tokens=batch * chunk, max_logprobs=max(args.logprobs, 0),
        max_n=max(args.n, 1), speculative_config=args.speculative_config)


if __name__ == "__main__":
    sys.exit(main())
