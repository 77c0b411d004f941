"""Rotary position embeddings with Hugging Face's frequency scalings.

Pairing is Hugging Face's "rotate_half" (dims i and i + H/2 rotate together); checkpoints in the
llama2.c interleaved convention are permuted at conversion, as HF's own export does.

`dynamic` (NTK) scaling depends on the sequence length: HF recomputes the frequencies from the
longest position seen in a forward call. We use, per sequence, the longest position in the
current step, which equals HF for a single sequence generated token by token; a speculative
verify step (`per_token=True`) gives each token the frequencies of its own position, as the
plain decode steps it stands for would, so speculation never changes the output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Static inverse frequencies [H/2] (float32) for default, linear and llama3 scaling."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h))
    scaling = cfg.rope_scaling
    if scaling.rope_type == "linear":
        inv = inv / scaling.factor
    elif scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(is_medium, smoothed, scaled)
    return inv.astype(np.float32)


def _dynamic_inv_frequencies(cfg: ModelConfig, seq_len: jax.Array) -> jax.Array:
    """NTK-aware frequencies [..., H/2] for sequences of length `seq_len` [...]."""
    h, factor = cfg.head_dim, cfg.rope_scaling.factor
    max_pos = cfg.max_position_embeddings
    seq_len = jnp.maximum(seq_len.astype(jnp.float32), float(max_pos))
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (h / (h - 2))
    exponents = jnp.arange(0, h, 2, dtype=jnp.float32) / h
    return 1.0 / (base[..., None] ** exponents)


def rope_angles(cfg: ModelConfig, positions: jax.Array, *, per_token: bool = False
                ) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H/2] float32 for integer `positions` [B, T]."""
    pos = positions.astype(jnp.float32)
    if cfg.rope_scaling.rope_type == "dynamic":
        lens = positions if per_token else jnp.max(positions, axis=1, keepdims=True)
        inv = _dynamic_inv_frequencies(cfg, lens + 1)  # [B, T or 1, H/2]
        angles = pos[:, :, None] * inv
    else:
        angles = pos[:, :, None] * jnp.asarray(inv_frequencies(cfg))[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] by cos/sin [B, T, H/2]; computed in x's dtype like HF."""
    cos = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([sin, sin], axis=-1)[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
