"""The Llama family in Flax NNX: Llama 2/3/3.x, Mistral, Qwen2 (q/k/v bias).

Layer weights are stacked on a leading `layers` axis and the decoder runs as one `lax.scan`:
one compiled layer body whatever the depth (fast compiles), and a `layers` axis that pipeline
parallelism can split into stages. The model is used functionally (STYLE.md rule 1): the paged
cache goes in and the updated cache comes out; nothing is mutated in place.

Every parameter names its logical axes in the `axes` metadata; `sharding/rules.py` maps them to
mesh axes. Activations are constrained with the same names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer import ops
from jaxinfer.config import Kernels, ModelConfig
from jaxinfer.kv_cache import CACHE_AXES, SCALE_AXES, PagedKVCache
from jaxinfer.quant import QuantArray
from jaxinfer.rope import apply_rope, rope_angles
from sharding.rules import constrain

_INIT = jax.nn.initializers.normal(stddev=0.02)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back, then scaled (Hugging Face's order)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=_INIT) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


# Logical axes of one layer of each projection weight (the stacks add "layers" in front).
PROJECTION_AXES = {
    "wq": ("embed", "heads", "head_dim"), "wk": ("embed", "kv_heads", "head_dim"),
    "wv": ("embed", "kv_heads", "head_dim"), "wo": ("heads", "head_dim", "embed"),
    "w_gate": ("embed", "ffn"), "w_up": ("embed", "ffn"), "w_down": ("ffn", "embed"),
}


def _ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


class DecoderLayers(nnx.Module):
    """All decoder layers, weights stacked on axis 0 (`layers`)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs) -> None:
        L, D, N, K, H, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, cfg.intermediate_size)
        self.attn_norm = _ones((L, D), ("layers", "embed"), dtype)
        ax = {name: ("layers",) + a for name, a in PROJECTION_AXES.items()}
        self.wq = _param(rngs, (L, D, N, H), ax["wq"], dtype)
        self.wk = _param(rngs, (L, D, K, H), ax["wk"], dtype)
        self.wv = _param(rngs, (L, D, K, H), ax["wv"], dtype)
        if cfg.attention_bias:
            self.bq = _param(rngs, (L, N, H), ("layers", "heads", "head_dim"), dtype)
            self.bk = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
            self.bv = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
        self.wo = _param(rngs, (L, N, H, D), ax["wo"], dtype)
        self.mlp_norm = _ones((L, D), ("layers", "embed"), dtype)
        self.w_gate = _param(rngs, (L, D, F), ax["w_gate"], dtype)
        self.w_up = _param(rngs, (L, D, F), ax["w_up"], dtype)
        self.w_down = _param(rngs, (L, F, D), ax["w_down"], dtype)

    def weights(self) -> dict[str, jax.Array]:
        # get_value, not var[...]: a quantized weight is a QuantArray pytree, not an array.
        return {name: var.get_value() for name, var in vars(self).items()
                if isinstance(var, nnx.Param)}


def _layer(cfg: ModelConfig, kernels: Kernels, w: dict[str, jax.Array], layer: jax.Array,
           x: jax.Array, cache: PagedKVCache, cos: jax.Array, sin: jax.Array,
           positions: jax.Array, block_tables: jax.Array, seq_lens: jax.Array,
           slots: jax.Array, reduce_dtype: str | None) -> tuple[jax.Array, PagedKVCache]:
    """One decoder block on x [B, T, D] with the layer's weights `w`: sliced (no leading axis),
    or whole stacks read at `layer` (quantized weights; float projections at decode with the
    Pallas kernels, see `Llama.run_layers`)."""

    def linear(h, name, contract=1):
        return ops.linear(h, w[name], contract=contract, layer=layer, kernels=kernels,
                          axes=PROJECTION_AXES[name], reduce_dtype=reduce_dtype)

    h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q = linear(h, "wq")  # [B, T, N, H]
    k = linear(h, "wk")  # [B, T, K, H]
    v = linear(h, "wv")
    if cfg.attention_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    k_pages, v_pages, k_scale, v_scale = ops.write_kv(
        cache.k, cache.v, cache.k_scale, cache.v_scale, layer, k, v, slots, kernels=kernels)
    attn = ops.paged_attention(
        q, k_pages, v_pages, layer, block_tables, seq_lens, positions,
        k_scale=k_scale, v_scale=v_scale, scale=cfg.head_dim ** -0.5,
        sliding_window=cfg.sliding_window, kernels=kernels)
    x = x + constrain(linear(attn, "wo", contract=2),
                      ("batch", "seq", "embed"))
    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    gate = linear(h, "w_gate")  # [B, T, F]
    up = linear(h, "w_up")
    act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "ffn"))
    x = x + constrain(linear(act, "w_down"),
                      ("batch", "seq", "embed"))
    return x, PagedKVCache(k=k_pages, v=v_pages, k_scale=k_scale, v_scale=v_scale)


def _constrain_cache(cache: PagedKVCache) -> PagedKVCache:
    """Pin the cache carried through the layer loop to its declared layout. Without it, when KV
    heads are replicated (tp > K) XLA may carry them split inside the loop and all-gather the
    whole cache when the step returns."""
    def pin(x, axes):
        return None if x is None else constrain(x, axes)
    return PagedKVCache(k=pin(cache.k, CACHE_AXES), v=pin(cache.v, CACHE_AXES),
                        k_scale=pin(cache.k_scale, SCALE_AXES),
                        v_scale=pin(cache.v_scale, SCALE_AXES))


class Llama(nnx.Module):
    """Decoder-only transformer; `__call__` runs the layers, `logits` the head."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), dtype)
        self.layers = DecoderLayers(cfg, dtype=dtype, rngs=rngs)
        self.final_norm = _ones((D,), ("embed",), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), dtype)

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        positions: jax.Array,  # [B, T] int32
        cache: PagedKVCache,
        block_tables: jax.Array,  # [B, W] int32
        seq_lens: jax.Array,  # [B] int32, cached tokens after this step
        slots: jax.Array,  # [B, T] int32 flat cache slot per token, < 0 for padding
        *,
        kernels: Kernels = "reference",
        unroll_layers: int | bool = 1,
        reduce_dtype: str | None = None,  # tp all-reduce dtype override (ops.tp_reduce_dtype)
        rope_per_token: bool = False,  # dynamic RoPE as if each token came in its own step
    ) -> tuple[jax.Array, PagedKVCache]:
        """Run the decoder; returns the final-normed hidden states [B, T, D] and the cache."""
        x = self.embed_tokens(tokens, reduce_dtype=reduce_dtype)
        x, cache = self.run_layers(x, positions, cache, block_tables, seq_lens, slots,
                                   kernels=kernels, unroll_layers=unroll_layers,
                                   reduce_dtype=reduce_dtype, rope_per_token=rope_per_token)
        return self.norm(x), cache

    def embed_tokens(self, tokens: jax.Array, *, reduce_dtype: str | None = None) -> jax.Array:
        """tokens [B, T] -> embeddings [B, T, D]."""
        return constrain(ops.embedding(self.embed[...], tokens, reduce_dtype=reduce_dtype),
                         ("batch", "seq", "embed"))

    def run_layers(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T] int32
        cache: PagedKVCache,
        block_tables: jax.Array,  # [B, W] int32
        seq_lens: jax.Array,  # [B] int32
        slots: jax.Array,  # [B, T] int32, < 0 for padding
        *,
        kernels: Kernels = "reference",
        unroll_layers: int | bool = 1,
        reduce_dtype: str | None = None,
        rope_per_token: bool = False,
    ) -> tuple[jax.Array, PagedKVCache]:
        """Run the layers this module holds on x [B, T, D]. Under pipeline parallelism that is
        one stage's share: its stacked weights and its cache hold only the stage's layers
        (`sharding/pipeline.py`), so the count comes from the arrays, not the config."""
        cfg = self.cfg
        cos, sin = rope_angles(cfg, positions, per_token=rope_per_token)

        weights = self.layers.weights()
        # Quantized weights stay whole: their kernels read layer `layer` of the stack in place
        # (scanning over them would slice each out of the stack: a copy per layer and step).
        # So do the float projections where the Pallas kernels read them in place (decode).
        in_place = ops.reads_layers_in_place(kernels, x.shape[0] * x.shape[1])
        stacked = {k: v for k, v in weights.items()
                   if isinstance(v, QuantArray) or (in_place and k in PROJECTION_AXES)}
        scanned = {k: v for k, v in weights.items() if k not in stacked}

        def body(carry, xs):
            x, cache = carry
            w, layer = xs
            x, cache = _layer(cfg, kernels, {**w, **stacked}, layer, x, cache, cos, sin,
                              positions, block_tables, seq_lens, slots, reduce_dtype)
            return (x, _constrain_cache(cache)), None

        layer_ids = jnp.arange(weights["attn_norm"].shape[0], dtype=jnp.int32)
        # unroll_layers: layers per loop iteration (True or >= the count: fully unrolled).
        (x, cache), _ = jax.lax.scan(body, (x, cache), (scanned, layer_ids),
                                     unroll=unroll_layers if isinstance(unroll_layers, bool)
                                     else max(1, min(unroll_layers, layer_ids.shape[0])))
        return x, cache

    def norm(self, x: jax.Array) -> jax.Array:
        """The final RMSNorm, [..., D] -> [..., D]."""
        return rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)

    def logits(self, hidden: jax.Array, *, kernels: Kernels = "reference") -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:  # the embedding table is never quantized
            out = jnp.einsum("...d,vd->...v", hidden, self.embed[...],
                             preferred_element_type=jnp.float32)
        else:
            out = ops.linear(hidden, self.lm_head.get_value(), kernels=kernels,
                             out_dtype=jnp.float32)
        return constrain(out, ("batch",) + (None,) * (out.ndim - 2) + ("vocab",))


def quantized_weights(cfg: ModelConfig, kind: str) -> dict[tuple[str, ...], tuple[int, int]]:
    """The weights a `kind` ("int8" | "fp8" | "int4") quantization replaces by QuantArrays:
    param path -> (stacked leading dims, contraction dims). Layer projections always; an untied
    lm_head for int8 only (W8A8 would quantize the final hidden state, costing logit precision;
    int4 keeps it float as AWQ and GPTQ checkpoints do); the embedding never (a gather, and
    the head itself when tied)."""
    out = {("layers", name): (1, 1) for name in ("wq", "wk", "wv", "w_gate", "w_up", "w_down")}
    out[("layers", "wo")] = (1, 2)
    if kind == "int8" and not cfg.tie_word_embeddings:
        out[("lm_head",)] = (0, 1)
    return out


def create(cfg: ModelConfig, *, dtype=jnp.float32, seed: int = 0) -> Llama:
    return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32) -> Llama:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and axes, no memory."""
    return nnx.eval_shape(lambda: create(cfg, dtype=dtype))


def param_axes(model: Llama):
    """Pure-dict tree of each parameter's logical axes (tuples)."""
    _, state = nnx.split(model)
    axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes) if hasattr(nnx, "to_pure_dict") else axes.to_pure_dict()
