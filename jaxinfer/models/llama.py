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
from jaxinfer.kv_cache import PagedKVCache
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


def _ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


class DecoderLayers(nnx.Module):
    """All decoder layers, weights stacked on axis 0 (`layers`)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs) -> None:
        L, D, N, K, H, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, cfg.intermediate_size)
        self.attn_norm = _ones((L, D), ("layers", "embed"), dtype)
        self.wq = _param(rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), dtype)
        self.wk = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dtype)
        self.wv = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dtype)
        if cfg.attention_bias:
            self.bq = _param(rngs, (L, N, H), ("layers", "heads", "head_dim"), dtype)
            self.bk = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
            self.bv = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), dtype)
        self.wo = _param(rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), dtype)
        self.mlp_norm = _ones((L, D), ("layers", "embed"), dtype)
        self.w_gate = _param(rngs, (L, D, F), ("layers", "embed", "ffn"), dtype)
        self.w_up = _param(rngs, (L, D, F), ("layers", "embed", "ffn"), dtype)
        self.w_down = _param(rngs, (L, F, D), ("layers", "ffn", "embed"), dtype)

    def weights(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


def _layer(cfg: ModelConfig, kernels: Kernels, w: dict[str, jax.Array], layer: jax.Array,
           x: jax.Array, cache: PagedKVCache, cos: jax.Array, sin: jax.Array,
           positions: jax.Array, block_tables: jax.Array, seq_lens: jax.Array,
           slots: jax.Array) -> tuple[jax.Array, PagedKVCache]:
    """One decoder block on x [B, T, D] with the layer's weights `w` (no leading axis)."""
    h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dnh->btnh", h, w["wq"])
    k = jnp.einsum("btd,dkh->btkh", h, w["wk"])
    v = jnp.einsum("btd,dkh->btkh", h, w["wv"])
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
    x = x + constrain(jnp.einsum("btnh,nhd->btd", attn, w["wo"]), ("batch", "seq", "embed"))
    h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", h, w["w_gate"])
    up = jnp.einsum("btd,df->btf", h, w["w_up"])
    act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "ffn"))
    x = x + constrain(jnp.einsum("btf,fd->btd", act, w["w_down"]), ("batch", "seq", "embed"))
    return x, PagedKVCache(k=k_pages, v=v_pages, k_scale=k_scale, v_scale=v_scale)


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
        unroll_layers: bool = False,
    ) -> tuple[jax.Array, PagedKVCache]:
        """Run the decoder; returns the final-normed hidden states [B, T, D] and the cache."""
        cfg = self.cfg
        x = constrain(jnp.take(self.embed[...], tokens, axis=0), ("batch", "seq", "embed"))
        cos, sin = rope_angles(cfg, positions)

        def body(carry, xs):
            x, cache = carry
            w, layer = xs
            x, cache = _layer(cfg, kernels, w, layer, x, cache, cos, sin, positions,
                              block_tables, seq_lens, slots)
            return (x, cache), None

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (self.layers.weights(), layer_ids),
                                     unroll=unroll_layers)
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:
            out = jnp.einsum("...d,vd->...v", hidden, self.embed[...],
                             preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("...d,dv->...v", hidden, self.lm_head[...],
                             preferred_element_type=jnp.float32)
        return constrain(out, ("batch",) + (None,) * (out.ndim - 2) + ("vocab",))


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
