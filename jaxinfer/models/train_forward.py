"""A dense (non-paged) causal-LM forward of the Llama model, for training and for checks.

The serving model (`llama.Llama`) reads and writes a paged KV cache; training needs none of
that: the whole sequence is known, so every layer attends causally over it in one go. This
module runs the same computation on the same parameters (the pure dict of `llama.Llama`:
`embed`, `layers/{attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down}`, `final_norm`,
`lm_head` when untied) with the same pieces (`rms_norm`, `rope_angles`, `apply_rope`), so a
model trained here is the model served there, and the logits match Hugging Face's.

`dtype` is the compute dtype: float32 master weights are cast to it inside the function, so
their gradients stay float32 (mixed precision). Logits are always float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import rms_norm
from jaxinfer.rope import apply_rope, rope_angles

Attention = Literal["xla", "cudnn"]


def _check(cfg: ModelConfig) -> None:
    if cfg.sliding_window is not None:
        raise ValueError("train_forward: sliding-window attention is not supported")


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, *, dtype=jnp.float32,
            attention: Attention = "xla", dropout: float = 0.0,
            key: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] int32 (positions 0..T-1) -> float32 logits [B, T, V].

    `dropout` > 0 (training only, needs `key`) drops residual-branch outputs and embeddings.
    """
    _check(cfg)
    p = jax.tree.map(lambda w: w.astype(dtype), params)
    B, T = tokens.shape
    eps = cfg.rms_norm_eps
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_angles(cfg, positions)  # [B, T, H/2]
    use_dropout = dropout > 0.0
    if use_dropout and key is None:
        raise ValueError("train_forward: dropout needs a PRNG key")
    # One PRNG key for the embeddings and one per layer (scanned with its weights).
    rngs = jax.random.split(key, cfg.num_layers + 1) if use_dropout else None

    def drop(x, rng):
        if not use_dropout:
            return x
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        return jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)

    x = drop(p["embed"][tokens], rngs[0] if use_dropout else None)  # [B, T, D]

    def layer(x, xs):
        w, rng = xs
        rng_attn, rng_mlp = jax.random.split(rng) if use_dropout else (None, None)
        h = rms_norm(x, w["attn_norm"], eps)
        q = jnp.einsum("btd,dnh->btnh", h, w["wq"])  # [B, T, N, H]
        k = jnp.einsum("btd,dkh->btkh", h, w["wk"])  # [B, T, K, H]
        v = jnp.einsum("btd,dkh->btkh", h, w["wv"])
        if cfg.attention_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = jax.nn.dot_product_attention(q, k, v, scale=cfg.head_dim ** -0.5,
                                            is_causal=True, implementation=attention)
        x = x + drop(jnp.einsum("btnh,nhd->btd", attn, w["wo"]), rng_attn)
        h = rms_norm(x, w["mlp_norm"], eps)
        act = jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])  # [B, T, F]
        return x + drop(act @ w["w_down"], rng_mlp), None

    x, _ = jax.lax.scan(layer, x, (p["layers"], rngs[1:] if use_dropout else None))
    x = rms_norm(x, p["final_norm"], eps)
    if cfg.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", x, p["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", x, p["lm_head"], preferred_element_type=jnp.float32)


def loss(cfg: ModelConfig, params: dict, windows: jax.Array, **kwargs) -> jax.Array:
    """Mean next-token cross entropy (nats/token) of windows [B, T + 1] int32."""
    logits = forward(cfg, params, windows[:, :-1], **kwargs)  # [B, T, V]
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(logz - target)


def greedy(logits_fn: Callable[[jax.Array], jax.Array], prompt: Sequence[int], *,
           max_new_tokens: int, length: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of `prompt` by recomputing the whole sequence each token.

    `logits_fn` maps tokens [1, length] to logits [1, length, V]; the buffer is padded to a
    fixed `length` (one compile), which is exact because attention is causal: positions
    before the padding never see it.
    """
    if len(prompt) + max_new_tokens > length:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"length {length}")
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(prompt)] = prompt
    out: list[int] = []
    for i in range(len(prompt), len(prompt) + max_new_tokens):
        logits = logits_fn(jnp.asarray(buf))
        token = int(jnp.argmax(logits[0, i - 1]))
        out.append(token)
        if token in stop_ids:
            break
        buf[0, i] = token
    return out
