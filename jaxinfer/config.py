"""Frozen, hashable configs: one per concern (STYLE.md rule 2).

`ModelConfig` describes the network, `EngineConfig` how it is run (page size, buckets,
dtypes, kernels), `ServeConfig` the server around it. All are static jit arguments, so they
must stay hashable: tuples, not lists. Hugging Face `config.json` files are mapped to
`ModelConfig` by `checkpoints.hf_config`; named random-weight presets live in `PRESETS`, and
trained models shipped inside the package (Hugging Face directories) in `BUNDLED_MODELS`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

from jaxinfer.errors import ConfigError
from jaxinfer.hf_cache import cached_snapshot, is_repo_id

# Weight quantization modes (`--quant`; jaxinfer/quant.py implements them). Here, JAX-free, so
# the server's front can offer the flag without importing JAX.
QUANT_MODES = ("none", "int8", "int8-g64", "int8-g128", "fp8", "int4-g128")

Family = Literal["llama", "mistral", "qwen2"]
RopeType = Literal["default", "linear", "dynamic", "llama3"]
Kernels = Literal["reference", "pallas"]
KernelChoice = Literal["auto", "reference", "pallas"]
DTypeName = Literal["bfloat16", "float16", "float32"]

FAMILIES = ("llama", "mistral", "qwen2")
DTYPES = ("bfloat16", "float16", "float32")
# KV cache dtypes: the float ones, or 8-bit with per-page-per-head float32 scales.
CACHE_DTYPES = DTYPES + ("int8", "float8_e4m3fn")
KERNELS = ("reference", "pallas")
KERNEL_CHOICES = ("auto",) + KERNELS
GPU_LAYER_UNROLL = 4  # EngineConfig.unroll_layers when unset, on GPU


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face defines it (`rope_scaling` in config.json)."""

    rope_type: RopeType = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "dynamic", "llama3"):
            raise ConfigError(f"rope_scaling.rope_type: unsupported value {self.rope_type!r}")
        if self.rope_type != "default" and not self.factor > 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                "rope_scaling.high_freq_factor must be > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias), tied or untied embeddings."""

    family: Family = "llama"
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # attend to the last `sliding_window` keys only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family: unsupported architecture {self.family!r} (supported: {FAMILIES})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ConfigError("eos_token_ids must be a tuple of ints")

    @property
    def q_per_kv(self) -> int:
        """Query heads served by each KV head (GQA group size; 1 = MHA, N = MQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def context_limit(self) -> int:
        """Longest sequence the model is meant for (dynamic NTK scaling stretches it)."""
        if self.rope_scaling.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope_scaling.factor)
        return self.max_position_embeddings

    @property
    def num_params(self) -> int:
        d, f, n, k, h, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                            self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = d * n * h * 2 + d * k * h * 2 + (n * h + 2 * k * h if self.attention_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        return self.num_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        """Inverse of `to_json` (the format of `jaxinfer_config.json`)."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"jaxinfer_config.json: unknown field(s) {unknown}")
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"jaxinfer_config.json: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How a model is run: cache geometry, the static shape buckets, dtypes and kernels. One
    config for offline generation, the bench and the server: they run the same programs.

    `num_pages` None sizes the KV cache from the device memory left after the weights
    (`gpu_memory_utilization`, as vLLM does) on GPU, and to hold every decode slot at
    `max_seq_len` elsewhere; `kernels` "auto" is Pallas on GPU and the references elsewhere.
    `jaxinfer.engine.core.resolve_engine_config` fills both in once the devices are known."""

    page_size: int = 16  # G: tokens per KV page
    num_pages: int | None = None  # P: pages in the pool (page 0 is a valid page)
    gpu_memory_utilization: float = 0.9  # of each device's memory, weights and cache included
    max_seq_len: int = 2048  # longest sequence (prompt + generated) a slot may hold
    # Decode batch sizes B; the largest is the number of decode slots (running sequences).
    # Decode reads every weight whatever B, so few buckets cost little and keep warm-up short.
    batch_buckets: tuple[int, ...] = (16, 32, 64)
    # Prefill chunk lengths T and rows R (sequences per prefill call); R x T <= the budget.
    prefill_buckets: tuple[int, ...] = (128, 512)
    prefill_rows: tuple[int, ...] = (1, 4, 16)
    # Decode block-table widths (pages); None: the full width only (the Pallas kernels read
    # only a row's own pages; the reference attention reads every page of the table and gains
    # from narrower ones). The last covers pages_per_seq.
    page_buckets: tuple[int, ...] | None = None
    # Tokens per engine step: decode tokens of running sequences plus prefill chunks. It also
    # caps a prefill call's padded size (rows x chunk), so a step's work stays bounded. Served
    # at saturation on one H200 (1B shape, 256 requests, benchmarks/results/engine_*): 512 ->
    # 24.5k tok/s and TTFT p99 134 ms at half load, 2048 -> 29.4k and 57 ms.
    max_num_batched_tokens: int = 2048
    # Decode tokens per dispatch when no prefill is waiting to join the step (stops on device);
    # 1 turns multi-step decoding off. Same run, budget 2048: 1 -> 28.3k tok/s, 4 -> 29.6k,
    # 8 -> 29.4k; TTFT p99 at half load 87 / 56 / 57 ms.
    decode_steps: int = 4
    dtype: DTypeName = "bfloat16"  # weights and activations
    cache_dtype: str | None = None  # KV cache, one of CACHE_DTYPES; None = same as dtype
    kernels: KernelChoice = "auto"
    # Layers per iteration of the layer loop (`lax.scan`'s unroll); a value >= the layer count
    # unrolls it fully. None: GPU_LAYER_UNROLL on GPU, 1 elsewhere. Measured on the H100
    # (Llama-3.2-1B shape, in-process serving at 64 sequences): 1 -> 16.0k tok/s and 27 s of
    # warm-up compiles, 4 -> 17.0k and 34 s, 16 (full) -> 18.2k and 185 s.
    unroll_layers: int | None = None
    # dtype of the tensor-parallel all-reduces the kernels issue (row-parallel partial sums,
    # the vocab-parallel embedding); None: the activations' dtype on GPU, as Megatron and vLLM
    # reduce (2x H200, 8B shape, tp=2, batch 32: 5.33 ms per decode step in bfloat16 against
    # 5.66 in float32), float32 elsewhere (a bfloat16 psum in a shard_map aborts XLA's CPU
    # compiler).
    tp_reduce_dtype: DTypeName | None = None
    max_logprobs: int = 20  # top logprobs a request may ask for (static in the step programs)
    max_n: int = 8  # samples per request
    max_stop_token_ids: int = 64  # stop token ids per request (checked on device)
    enable_prefix_cache: bool = True
    # Speculative decoding, vLLM's JSON (`--speculative-config`; jaxinfer/speculative/config.py):
    # {"method": "draft_model", "model": DIR, "num_speculative_tokens": K}, {"method": "ngram",
    # ...}, {"method": "layer_skip", "num_layers": N, ...} or a plug-in; None = off.
    speculative_config: str | None = None

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a positive power of two, got {self.page_size}")
        for name in ("max_seq_len", "decode_steps", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ConfigError(f"num_pages must be positive, got {self.num_pages}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        for name in ("batch_buckets", "prefill_buckets", "prefill_rows"):
            b = getattr(self, name)
            if not b or list(b) != sorted(set(b)) or b[0] <= 0:
                raise ConfigError(f"{name} must be strictly increasing positive ints, got {b}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"cache_dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        if self.tp_reduce_dtype is not None and self.tp_reduce_dtype not in DTYPES:
            raise ConfigError(f"tp_reduce_dtype must be one of {DTYPES}, got "
                              f"{self.tp_reduce_dtype!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.unroll_layers is not None and (isinstance(self.unroll_layers, bool)
                                               or self.unroll_layers < 1):
            raise ConfigError(f"unroll_layers must be a positive int (layers per loop "
                              f"iteration), got {self.unroll_layers!r}")
        if self.max_num_batched_tokens < self.batch_buckets[-1]:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= the largest "
                f"batch bucket ({self.batch_buckets[-1]}) so every running sequence decodes "
                "each step")
        if self.prefill_rows[0] * self.prefill_buckets[0] > self.max_num_batched_tokens:
            raise ConfigError(
                f"the smallest prefill call ({self.prefill_rows[0]} rows x "
                f"{self.prefill_buckets[0]} tokens) exceeds max_num_batched_tokens "
                f"({self.max_num_batched_tokens})")
        w = self.page_buckets
        if w is not None and (not w or list(w) != sorted(set(w)) or w[0] <= 0
                              or w[-1] < self.pages_per_seq):
            raise ConfigError(
                f"page_buckets must be strictly increasing positive ints ending at >= "
                f"pages_per_seq ({self.pages_per_seq}), got {w}")
        spec = self.speculative  # a ConfigError names a bad key
        if spec is not None and self.max_seq_len < spec.k + 2:
            raise ConfigError(f"max_seq_len ({self.max_seq_len}) is too short for "
                              f"{spec.k} speculative tokens")
        if self.max_logprobs < 0 or self.max_n < 1 or self.max_stop_token_ids < 0:
            raise ConfigError(f"max_logprobs and max_stop_token_ids must be >= 0 and max_n >= 1, "
                              f"got {self.max_logprobs}, {self.max_stop_token_ids} and "
                              f"{self.max_n}")

    @property
    def speculative(self):
        """`speculative_config` parsed (a `SpeculativeConfig`), or None."""
        from jaxinfer.speculative.config import parse_speculative_config

        return parse_speculative_config(self.speculative_config)

    @property
    def layer_unroll(self) -> int:
        """`unroll_layers` resolved for the default backend."""
        if self.unroll_layers is not None:
            return self.unroll_layers
        import jax  # here: config stays importable without initialising a backend

        return GPU_LAYER_UNROLL if jax.default_backend() == "gpu" else 1

    def resolved_kernels(self, backend: str) -> Kernels:
        """"auto" -> "pallas" on GPU, "reference" elsewhere."""
        if self.kernels != "auto":
            return self.kernels
        return "pallas" if backend == "gpu" else "reference"

    @property
    def pages_per_seq(self) -> int:
        """Block-table width needed for the longest sequence."""
        return math.ceil(self.max_seq_len / self.page_size)

    @property
    def num_slots(self) -> int:
        """Decode slots: the most sequences that run (hold a slot) at once."""
        return self.batch_buckets[-1]

    @property
    def kv_dtype(self) -> str:
        return self.cache_dtype or self.dtype

    @property
    def pool_pages(self) -> int:
        """`num_pages`, which must be resolved by now (`resolved` or an explicit value)."""
        if self.num_pages is None:
            raise ConfigError("num_pages is not resolved yet (EngineConfig.resolved sizes it)")
        return self.num_pages


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The gRPC server around an engine."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (logged when SERVING)
    max_queue: int = 1024
    metrics_port: int | None = None
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: str | None = None  # PEM private key
    max_message_bytes: int = 4 * 1024 * 1024  # largest request or response message
    drain_timeout: float = 60.0  # seconds SIGTERM waits for in-flight requests
    # seconds one write to a streaming client may wait (the client reads nothing) before the
    # stream is cancelled and its pages freed (docs/reliability.md)
    stream_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.max_queue <= 0:
            raise ConfigError(f"max_queue must be positive, got {self.max_queue}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if not self.drain_timeout > 0:
            raise ConfigError(f"drain_timeout must be > 0, got {self.drain_timeout}")
        if not self.stream_timeout > 0:
            raise ConfigError(f"stream_timeout must be > 0, got {self.stream_timeout}")


# Random-weight presets: real shapes, no download. `dummy` is tiny enough for a laptop CPU.
PRESETS: dict[str, ModelConfig] = {
    "dummy": ModelConfig(
        family="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=256, eos_token_ids=(257,),
    ),
    "llama-3.2-1b-shape": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=256,
        eos_token_ids=(257,),
    ),
    "llama-3.1-8b-shape": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=256,
        eos_token_ids=(257,),
    ),
    "llama-3-70b-shape": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=256,
        eos_token_ids=(257,),
    ),
}


# Trained models inside the package: `demo` (3.8M parameters, trained on the Python standard
# library by benchmarks/train_models.py; jaxinfer/models/demo/README.md) is what `python -m serve`
# serves when no --model is given.
BUNDLED_MODELS: dict[str, Path] = {"demo": Path(__file__).parent / "models" / "demo"}
DEFAULT_MODEL = "demo"


def model_source(model: str, revision: str | None = None) -> ModelConfig | Path:
    """A `--model` value: a random preset's config, or the directory to load. The one place a
    --model string is resolved, in this order: a preset, a bundled model, a local directory,
    then a Hub id (`ORG/NAME`, at `revision`, default main) in the local Hugging Face cache
    (`jaxinfer.hf_cache`; nothing is downloaded). One error for anything else."""
    if model in PRESETS:
        return PRESETS[model]
    path = BUNDLED_MODELS.get(model, Path(model))
    if path.is_dir():
        return path
    if is_repo_id(model):
        return cached_snapshot(model, revision)
    raise ConfigError(
        f"--model {model!r} is neither a directory, a bundled model "
        f"({', '.join(sorted(BUNDLED_MODELS))}), a random-weight preset "
        f"({', '.join(sorted(PRESETS))}) nor a Hugging Face id (ORG/NAME)")


def resolve_model(model: str, revision: str | None = None) -> str:
    """`model` as every later step should see it: a Hub id becomes its snapshot directory (so
    --revision is applied once, at the command line); anything else is returned unchanged."""
    source = model_source(model, revision)
    if isinstance(source, ModelConfig) or source in (BUNDLED_MODELS.get(model), Path(model)):
        return model
    return str(source)


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


def replace(cfg, **overrides):
    """`dataclasses.replace` with a `ConfigError` naming an unknown field."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides:
        if key not in names:
            raise ConfigError(f"{type(cfg).__name__} has no field {key!r}")
    return dataclasses.replace(cfg, **overrides)
