"""Train small Llama-architecture models on the Python standard library, with our model code.

The corpus is the `*.py` source of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`, PSF-licensed; site-packages never), split into train and
validation by a hash of each file's relative path, so the split is the same on every run and
machine that has the file. The tokenizer is a byte-level BPE (`tokenizers`) trained on the
train files, with `<s>`/`</s>` (BOS/EOS) around each document. The ids are tokenized once into
one array that lives on the device; each step samples its random windows there (no host
input pipeline). Parameters are float32; with bfloat16 compute (the default on GPU) the
forward casts them (`jaxinfer/models/train_forward.py`). AdamW, linear warmup, cosine decay.

Each run writes a Hugging Face model directory (`config.json`, `model.safetensors` in HF's
names and [out, in] layouts, `tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`) that transformers and `jaxinfer.model_loader.load_model` both load,
from the parameters of the best validation loss. Stdout gets one JSON object per line: a
`config` line, a `train` line per log step (`train_loss`/`val_loss` in nats per token,
`tokens_per_s`), and a `final` line with the validation loss and greedy samples.

    python benchmarks/train_models.py --preset demo --out /tmp/demo --tokenizer /tmp/tok
    python benchmarks/train_models.py --preset target --out /tmp/target --tokenizer /tmp/tok \\
        --time-budget 120
    python benchmarks/train_models.py --measure-agreement /tmp/draft /tmp/target

`--tokenizer DIR` reuses DIR's tokenizer (or trains one and saves it there), so models trained
with the same DIR share a vocabulary. `--time-budget S` ends training after about S seconds:
it times the first steps, then fits the cosine schedule to the steps that fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from checkpoints.llama import tensor_map
from jaxinfer.config import ModelConfig
from jaxinfer.models import llama, train_forward

logger = logging.getLogger("train_models")

BOS, EOS = "<s>", "</s>"
VAL_FRACTION = 0.05
MAX_FILE_BYTES = 1 << 20  # larger stdlib files are generated tables, not code
SAMPLE_PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(",
                  "class Stack:\n    def __init__(self):\n", "    for i in range(")
TEST_DIRS = ("test", "tests", "idle_test")
CALIBRATE_FROM = 5  # --time-budget times the steps after this many


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainPreset:
    """A model shape plus its default training hyperparameters (flags override them)."""

    model: ModelConfig  # vocab_size is the tokenizer's target size; the trained one wins
    batch: int = 64
    seq_len: int = 512
    lr: float = 2e-3
    steps: int = 4000
    warmup: int = 100
    dropout: float = 0.0
    max_epochs: float | None = None  # caps steps: the corpus is small (~3M tokens)


def _llama(d: int, f: int, layers: int, heads: int, kv_heads: int, head_dim: int,
           vocab: int = 4096) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       tie_word_embeddings=True, max_position_embeddings=512)


# Cost per token ~ 2 x (layer params + LM head): demo 7.5 MFLOP, draft 7.6, target 75.0. The
# draft is ~1/10 of the target; demo and draft stay under 8 MB of bfloat16 weights.
PRESETS: dict[str, TrainPreset] = {
    "demo": TrainPreset(model=_llama(256, 448, 5, 4, 2, 64), lr=2e-3, steps=6000,
                        max_epochs=40),
    "draft": TrainPreset(model=_llama(256, 640, 4, 4, 2, 64), lr=2e-3, steps=6000,
                         max_epochs=40),
    # Many epochs over a small corpus: dropout, and the export keeps the best val loss.
    "target": TrainPreset(model=_llama(512, 1408, 12, 8, 4, 64), lr=1e-3, steps=6000,
                          warmup=200, dropout=0.1, max_epochs=16),
    # CPU tests only: a few seconds of training.
    "tiny": TrainPreset(model=_llama(64, 128, 2, 4, 2, 16, vocab=512), batch=8, seq_len=64,
                        lr=3e-3, steps=40, warmup=5),
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# -- corpus ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: list[str]  # texts, one per file
    val: list[str]
    stats: dict


def _bucket(rel: str) -> float:
    """A stable number in [0, 1) for a relative path (the split and the file order)."""
    return int(hashlib.sha256(rel.encode("utf-8")).hexdigest()[:8], 16) / 2 ** 32


def corpus_files(root: Path, *, include_tests: bool = True) -> list[tuple[float, str]]:
    """(bucket, relative path) of every stdlib `*.py`, ordered by bucket (a fixed shuffle)."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if "site-packages" in dirs or "dist-packages" in dirs or "__pycache__" in dirs:
            continue
        if not include_tests and any(d in TEST_DIRS for d in dirs):
            continue
        out.append((_bucket(rel.as_posix()), rel.as_posix()))
    return sorted(out)


def _read(root: Path, rels: list[str], max_files: int | None, max_bytes: int | None
          ) -> tuple[list[str], int]:
    texts, size, skipped = [], 0, 0
    for rel in rels:
        if (max_files is not None and len(texts) >= max_files) or (
                max_bytes is not None and size >= max_bytes):
            break
        data = (root / rel).read_bytes()
        if len(data) > MAX_FILE_BYTES:
            skipped += 1
            continue
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:  # a few test files are deliberately in other encodings
            skipped += 1
            continue
        size += len(data)
    return texts, skipped


def load_corpus(*, root: Path | None = None, include_tests: bool = True,
                max_files: int | None = None, max_bytes: int | None = None) -> Corpus:
    """The stdlib split by file; `max_files`/`max_bytes` cap the train side (val gets 1/8)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = corpus_files(root, include_tests=include_tests)
    train_rels = [rel for b, rel in files if b >= VAL_FRACTION]
    val_rels = [rel for b, rel in files if b < VAL_FRACTION]
    train, skip_t = _read(root, train_rels, max_files, max_bytes)
    val, skip_v = _read(root, val_rels, max_files and max(1, max_files // 8),
                        max_bytes and max(1, max_bytes // 8))
    if not train or not val:
        raise SystemExit(f"{root}: no usable *.py files for the train or validation split")
    stats = {"root": str(root), "train_files": len(train), "val_files": len(val),
             "train_bytes": sum(map(len, train)), "val_bytes": sum(map(len, val)),
             "skipped_files": skip_t + skip_v, "python": sys.version.split()[0]}
    return Corpus(train, val, stats)


# -- tokenizer ---------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over `texts`; ids 0 and 1 are BOS and EOS; BOS is prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    # BOS in front, as Llama's tokenizers do; transformers honours the post-processor and
    # `load_tokenizer` the add_bos_token flag written beside it (both: BOS once).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tok


def write_tokenizer(out: Path, tok, *, max_len: int) -> None:
    """tokenizer.json plus the config files transformers' AutoTokenizer reads."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, indent=2))


def get_tokenizer(tok_dir: Path | None, corpus: Corpus, vocab_size: int):
    """(tokenizer, seconds spent training it: 0 when reused from `tok_dir`)."""
    from tokenizers import Tokenizer

    if tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(tok_dir / "tokenizer.json")), 0.0
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus.train, vocab_size)
    seconds = time.perf_counter() - t0
    if tok_dir is not None:
        write_tokenizer(tok_dir, tok, max_len=4096)
    return tok, seconds


def encode_corpus(tok, texts: list[str]) -> np.ndarray:
    """One int32 array: <s> doc </s> <s> doc </s> ... (text that spells "<s>" stays text)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok.to_str())  # a copy: the flag below must not be saved
    tok.encode_special_tokens = True
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    encs = tok.encode_batch(texts, add_special_tokens=False)
    out = np.empty(sum(len(e.ids) + 2 for e in encs), np.int32)
    i = 0
    for e in encs:
        n = len(e.ids)
        out[i] = bos
        out[i + 1:i + 1 + n] = e.ids
        out[i + 1 + n] = eos
        i += n + 2
    return out


# -- Hugging Face export -----------------------------------------------------------------


def hf_config(cfg: ModelConfig, *, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": 0.02,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0],
        "pad_token_id": None, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }


def _to_hf(m, value: np.ndarray) -> np.ndarray:
    """Invert the loader's transform for one tensor; checked exactly against `m.transform`."""
    for candidate in (value.reshape(m.hf_shape[::-1]).T if len(m.hf_shape) == 2 else None,
                      value.reshape(m.hf_shape)):
        if candidate is not None and np.array_equal(m.transform(candidate), value):
            return np.ascontiguousarray(candidate)
    raise ValueError(f"no inverse layout for {m.hf_name} {value.shape} -> {m.hf_shape}")


def hf_tensors(cfg: ModelConfig, params: dict, *, dtype: str = "bfloat16") -> dict:
    """params (pure dict of llama.Llama) -> {HF tensor name: host array}, via the name map
    the loader itself uses (`checkpoints.llama.tensor_map`), so export and load agree."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    host = jax.device_get(params)
    out = {}
    for m in tensor_map(cfg):
        value = host
        for key in m.path:
            value = value[key]
        value = np.asarray(value, np.float32)
        for i, name in enumerate(m.hf_names()):
            out[name] = _to_hf(m, value if m.num_layers is None else value[i]).astype(np_dtype)
    return out


def save_hf_model(out: Path, cfg: ModelConfig, params: dict, tok, *,
                  dtype: str = "bfloat16") -> int:
    """Write a Hugging Face model directory; returns the weight file's size in bytes."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, tok, max_len=cfg.max_position_embeddings)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype=dtype), indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0],
        "pad_token_id": cfg.eos_token_ids[0]}, indent=2))
    weights = out / "model.safetensors"
    save_file(hf_tensors(cfg, params, dtype=dtype), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600
    return weights.stat().st_size


# -- training ----------------------------------------------------------------------------


def init_params(cfg: ModelConfig, seed: int) -> dict:
    """Float32 parameters from `llama.create`, output projections scaled by 1/sqrt(2L)."""
    state = nnx.split(llama.create(cfg, dtype=jnp.float32, seed=seed))[1]
    params = nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()
    scale = (2 * cfg.num_layers) ** -0.5
    for name in ("wo", "w_down"):
        params["layers"][name] = params["layers"][name] * scale
    return params


def lr_at(step: jax.Array, total: jax.Array, *, peak: float, warmup: int,
          floor: float = 0.1) -> jax.Array:
    """Linear warmup to `peak`, then cosine to `floor * peak` at `total` (a traced value, so a
    time budget can set it after the first steps are timed)."""
    step = step.astype(jnp.float32)
    warm = peak * (step + 1) / warmup
    progress = jnp.clip((step - warmup) / jnp.maximum(total.astype(jnp.float32) - warmup, 1.0),
                        0.0, 1.0)
    cos = peak * (floor + (1 - floor) * 0.5 * (1 + jnp.cos(math.pi * progress)))
    return jnp.where(step < warmup, warm, cos)


def optimizer(weight_decay: float) -> optax.GradientTransformation:
    """AdamW without the learning rate (applied in the step); no decay on norm weights."""
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.95),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask))


def make_steps(cfg: ModelConfig, tx, *, batch: int, seq_len: int, dtype, attention: str,
               dropout: float, peak_lr: float, warmup: int):
    """(train_step, eval_loss), both jitted. train_step samples its windows on the device."""
    fwd = dict(dtype=dtype, attention=attention)

    def train_step(params, opt_state, step, total, data, key):
        k_data, k_drop = jax.random.split(jax.random.fold_in(key, step))
        starts = jax.random.randint(k_data, (batch,), 0, data.shape[0] - seq_len - 1)
        windows = data[starts[:, None] + jnp.arange(seq_len + 1)]  # [B, T + 1]
        value, grads = jax.value_and_grad(
            lambda p: train_forward.loss(cfg, p, windows, dropout=dropout, key=k_drop, **fwd)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        lr = lr_at(step, total, peak=peak_lr, warmup=warmup)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, value

    def eval_loss(params, windows):  # windows [n, B, T + 1]
        return jnp.mean(jax.lax.map(lambda w: train_forward.loss(cfg, params, w, **fwd),
                                    windows))

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_loss)


def eval_windows(ids: np.ndarray, seq_len: int, batch: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping validation windows [n, b, T + 1] (fixed, so val losses compare)."""
    n = min((len(ids) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n < 1:
        raise SystemExit(f"validation split has {len(ids)} tokens, fewer than --seq-len + 1")
    b = min(batch, n)
    n = n // b * b
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return ids[idx].reshape(n // b, b, seq_len + 1)


def _attention_choices(choice: str, dtype) -> list[str]:
    if choice != "auto":
        return [choice]
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) != jnp.float32:
        return ["cudnn", "xla"]  # cuDNN's fused attention when this build has it
    return ["xla"]


def compile_steps(cfg, tx, example, *, attention: str, **kw):
    """Compile train and eval steps, falling back from cuDNN attention to XLA's if needed."""
    choices = _attention_choices(attention, kw["dtype"])
    for impl in choices:
        train_step, eval_loss = make_steps(cfg, tx, attention=impl, **kw)
        try:
            t0 = time.perf_counter()
            train_c = train_step.lower(*example["train"]).compile()
            eval_c = eval_loss.lower(*example["eval"]).compile()
            return train_c, eval_c, impl, time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 (an unsupported fused attention fails here)
            if impl == choices[-1]:
                raise
            logger.warning("attention %s failed to compile (%s); trying %s", impl,
                           str(e).splitlines()[0][:200], choices[choices.index(impl) + 1])
    raise AssertionError("unreachable")


def samples(cfg: ModelConfig, params: dict, tok, *, dtype, attention: str, length: int,
            max_new: int) -> list[dict]:
    """Greedy continuations of SAMPLE_PROMPTS (decoded text)."""
    fwd = jax.jit(lambda p, t: train_forward.forward(cfg, p, t, dtype=dtype, attention=attention))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = [bos] + tok.encode(prompt, add_special_tokens=False).ids
        new = min(max_new, length - len(ids))
        gen = train_forward.greedy(lambda t: fwd(params, t), ids, max_new_tokens=new,
                                   length=length, stop_ids=(eos,))
        out.append({"prompt": prompt, "completion": tok.decode(gen, skip_special_tokens=True),
                    "tokens": len(gen)})
    return out


def _dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(name)


def train(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    batch, seq_len = args.batch or preset.batch, args.seq_len or preset.seq_len
    steps, lr = args.steps or preset.steps, args.lr or preset.lr
    dropout = preset.dropout if args.dropout is None else args.dropout
    max_epochs = args.max_epochs or preset.max_epochs
    dtype = _dtype(args.dtype)
    t_start = time.perf_counter()

    corpus = load_corpus(include_tests=not args.exclude_tests, max_files=args.max_files,
                         max_bytes=args.max_bytes)
    tok_dir = Path(args.tokenizer) if args.tokenizer else None
    tok, tok_seconds = get_tokenizer(tok_dir, corpus, args.vocab_size or preset.model.vocab_size)
    t0 = time.perf_counter()
    train_ids, val_ids = encode_corpus(tok, corpus.train), encode_corpus(tok, corpus.val)
    encode_seconds = time.perf_counter() - t0
    if len(train_ids) <= seq_len + 1:
        raise SystemExit(f"train split has {len(train_ids)} tokens, need > --seq-len + 1")
    if max_epochs:
        steps = min(steps, max(1, math.ceil(max_epochs * len(train_ids) / (batch * seq_len))))
    warmup = min(args.warmup or preset.warmup, max(1, steps // 5))
    cfg = dataclasses.replace(preset.model, vocab_size=tok.get_vocab_size(),
                              max_position_embeddings=seq_len, bos_token_id=tok.token_to_id(BOS),
                              eos_token_ids=(tok.token_to_id(EOS),))
    emit({"event": "config", "model": args.preset, "params": cfg.num_params,
          "flops_per_token": flops_per_token(cfg), "dims": _dims(cfg), "batch": batch,
          "seq_len": seq_len, "steps": steps, "lr": lr, "warmup": warmup, "dropout": dropout,
          "max_epochs": max_epochs,
          "dtype": jnp.dtype(dtype).name, "backend": jax.default_backend(),
          "jax_version": jax.__version__, "train_tokens": int(len(train_ids)),
          "val_tokens": int(len(val_ids)), "tokenizer_train_s": round(tok_seconds, 2),
          "encode_s": round(encode_seconds, 2), **corpus.stats})

    params = init_params(cfg, args.seed)
    tx = optimizer(args.weight_decay)
    opt_state = tx.init(params)
    data = jnp.asarray(train_ids)
    val = jnp.asarray(eval_windows(val_ids, seq_len, batch, args.eval_tokens))
    key = jax.random.key(args.seed, impl="rbg")  # fast dropout bits on GPU (Philox)
    total = jnp.asarray(steps, jnp.int32)
    example = {"train": (params, opt_state, jnp.asarray(0, jnp.int32), total, data, key),
               "eval": (params, val)}
    train_step, eval_loss, attention, compile_s = compile_steps(
        cfg, tx, example, attention=args.attention, batch=batch, seq_len=seq_len, dtype=dtype,
        dropout=dropout, peak_lr=lr, warmup=warmup)

    def evaluate(p):
        t = time.perf_counter()
        value = float(eval_loss(p, val))
        return value, time.perf_counter() - t

    best_val, eval_s = evaluate(params)
    best, best_step = params, 0
    params = jax.tree.map(jnp.copy, params)  # `best` must survive the donation below
    emit({"event": "train", "model": args.preset, "step": 0, "train_loss": None,
          "val_loss": round(best_val, 4), "compile_s": round(compile_s, 2),
          "attention": attention})
    t_loop = time.perf_counter()
    t_log, losses, step = t_loop, [], 0
    while step < steps:
        params, opt_state, value = train_step(params, opt_state, jnp.asarray(step, jnp.int32),
                                              total, data, key)
        losses.append(value)
        step += 1
        if args.time_budget and step == CALIBRATE_FROM:  # past first-run costs
            jax.block_until_ready(value)
            t_calibrate = time.perf_counter()
        if args.time_budget and step == CALIBRATE_FROM + args.calibrate_steps:
            jax.block_until_ready(value)
            per_step = (time.perf_counter() - t_calibrate) / args.calibrate_steps
            left = args.time_budget - (time.perf_counter() - t_loop)
            fit = int(left / (per_step + eval_s / args.eval_every))
            steps = max(step, min(steps, step + fit))
            total = jnp.asarray(steps, jnp.int32)
            emit({"event": "plan", "model": args.preset, "step_s": round(per_step, 5),
                  "eval_s": round(eval_s, 3), "steps": steps})
        if step % args.eval_every == 0 or step == steps:
            train_loss = float(np.mean(jax.device_get(losses)))
            elapsed = time.perf_counter() - t_log
            val_loss, eval_s = evaluate(params)
            if val_loss < best_val:
                best_val, best_step = val_loss, step
                best = jax.tree.map(jnp.copy, params)
            emit({"event": "train", "model": args.preset, "step": step,
                  "train_loss": round(train_loss, 4), "val_loss": round(val_loss, 4),
                  "lr": float(lr_at(jnp.asarray(step - 1), total, peak=lr, warmup=warmup)),
                  "tokens_per_s": round(len(losses) * batch * seq_len / elapsed),
                  "elapsed_s": round(time.perf_counter() - t_loop, 2)})
            t_log, losses = time.perf_counter(), []
    train_s = time.perf_counter() - t_loop

    out = Path(args.out)
    weight_bytes = save_hf_model(out, cfg, best, tok, dtype=args.save_dtype)
    shown = samples(cfg, best, tok, dtype=dtype, attention=attention, length=seq_len,
                    max_new=args.sample_tokens)
    record = {"event": "final", "model": args.preset, "out": str(out), "steps": steps,
              "best_step": best_step, "val_loss": round(best_val, 4),
              "params": cfg.num_params, "weights_bytes": weight_bytes,
              "train_s": round(train_s, 2), "total_s": round(time.perf_counter() - t_start, 2),
              "samples": shown}
    emit(record)
    return record


# -- draft/target agreement --------------------------------------------------------------


def flops_per_token(cfg: ModelConfig) -> int:
    """2 x the weights a token multiplies through: every layer plus the LM head (the
    embedding lookup is free; with tied embeddings the one table is the head)."""
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return 2 * (cfg.num_params - lookup)


def _dims(cfg: ModelConfig) -> dict:
    return {"hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, "layers": cfg.num_layers,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "vocab": cfg.vocab_size, "tied": cfg.tie_word_embeddings}


def measure_agreement(args: argparse.Namespace) -> dict:
    """Greedy next-token agreement of draft vs target on the validation split, loading both
    directories through `jaxinfer.model_loader` (the serving path's loader)."""
    from tokenizers import Tokenizer

    from jaxinfer.model_loader import load_model
    from sharding.mesh import make_mesh

    draft_dir, target_dir = map(Path, args.measure_agreement)
    if (draft_dir / "tokenizer.json").read_bytes() != (target_dir / "tokenizer.json").read_bytes():
        raise SystemExit(f"{draft_dir} and {target_dir} have different tokenizers")
    mesh = make_mesh("dp=1", devices=jax.devices()[:1])
    draft = load_model(str(draft_dir), mesh=mesh, dtype="float32")
    target = load_model(str(target_dir), mesh=mesh, dtype="float32")
    seq_len = args.seq_len or min(draft.cfg.max_position_embeddings,
                                  target.cfg.max_position_embeddings)
    corpus = load_corpus(include_tests=not args.exclude_tests, max_files=args.max_files,
                         max_bytes=args.max_bytes)
    val_ids = encode_corpus(Tokenizer.from_file(str(target_dir / "tokenizer.json")), corpus.val)
    windows = eval_windows(val_ids, seq_len, args.batch or 16, args.eval_tokens)
    dtype = _dtype(args.dtype)
    attention = _attention_choices(args.attention, dtype)[-1]  # XLA's: no compile fallback here

    @jax.jit
    def batch_stats(dp, tp, w):  # w [B, T + 1]
        kw = dict(dtype=dtype, attention=attention)
        ld = train_forward.forward(draft.cfg, dp, w[:, :-1], **kw)
        lt = train_forward.forward(target.cfg, tp, w[:, :-1], **kw)
        same = jnp.sum(jnp.argmax(ld, -1) == jnp.argmax(lt, -1))

        def nll(logits):
            tgt = jnp.take_along_axis(logits, w[:, 1:, None], axis=-1)[..., 0]
            return jnp.sum(jax.nn.logsumexp(logits, -1) - tgt)
        return same, nll(ld), nll(lt)

    totals = np.zeros(3)
    for w in windows:
        totals += np.array([float(x) for x in batch_stats(draft.params, target.params,
                                                          jnp.asarray(w))])
    positions = windows.shape[0] * windows.shape[1] * seq_len
    record = {"event": "agreement", "draft": str(draft_dir), "target": str(target_dir),
              "agreement": round(totals[0] / positions, 4), "positions": int(positions),
              "seq_len": seq_len, "draft_val_loss": round(totals[1] / positions, 4),
              "target_val_loss": round(totals[2] / positions, 4),
              "draft_params": draft.cfg.num_params, "target_params": target.cfg.num_params,
              "cost_ratio": round(flops_per_token(draft.cfg) / flops_per_token(target.cfg), 4)}
    emit(record)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--out", help="Hugging Face model directory to write")
    p.add_argument("--tokenizer", help="tokenizer directory: reused if it holds tokenizer.json, "
                                       "else trained and saved there")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary when training a tokenizer")
    p.add_argument("--steps", type=int, help="training steps (the most, with --time-budget)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--max-epochs", type=float, help="cap steps at this many passes over the "
                                                    "train tokens")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--time-budget", type=float, help="seconds of training; fits the schedule")
    p.add_argument("--calibrate-steps", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=1 << 18, help="validation tokens per eval")
    p.add_argument("--max-files", type=int, help="corpus slice: train files (val gets 1/8)")
    p.add_argument("--max-bytes", type=int, help="corpus slice: train bytes (val gets 1/8)")
    p.add_argument("--exclude-tests", action="store_true", help="skip the stdlib's test dirs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (weights stay float32); auto: bfloat16 on GPU")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    p.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--measure-agreement", nargs=2, metavar=("DRAFT_DIR", "TARGET_DIR"))
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.measure_agreement:
        measure_agreement(args)
        return
    if not args.out:
        raise SystemExit("--out is required for training")
    if args.tokenizer and Path(args.tokenizer).resolve() == Path(args.out).resolve():
        raise SystemExit("--tokenizer must differ from --out")
    train(args)


if __name__ == "__main__":
    main()
