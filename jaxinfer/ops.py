"""Kernel dispatch: the one place that chooses a Pallas kernel or its plain-JAX reference.

Models call these functions and never import `pallas_kernels` directly, so every model runs on
CPU with the references and on GPU with the kernels, chosen by `EngineConfig.kernels`.
"""

from __future__ import annotations

import jax

from jaxinfer.config import Kernels
from jaxinfer.errors import ConfigError
from pallas_kernels import paged_attention as _paged


def check_kernels(kernels: Kernels) -> None:
    """Raise a clear ConfigError for a kernel choice this build cannot run."""
    if kernels == "pallas":
        raise ConfigError(
            "--kernels pallas is not available yet (the Pallas kernels land with the kernels "
            "issue); use --kernels reference"
        )
    if kernels != "reference":
        raise ConfigError(f"unknown kernels {kernels!r} (choose reference or pallas)")


def paged_attention(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [L, K, P, G, H]
    v_pages: jax.Array,  # [L, K, P, G, H]
    layer: jax.Array | int,
    block_tables: jax.Array,  # [B, W]
    seq_lens: jax.Array,  # [B]
    positions: jax.Array,  # [B, T]
    *,
    scale: float,
    sliding_window: int | None,
    kernels: Kernels,
) -> jax.Array:
    """Causal attention of T new queries per sequence over its paged cache -> [B, T, N, H]."""
    check_kernels(kernels)
    return _paged.paged_attention_reference(
        q, k_pages, v_pages, layer, block_tables, seq_lens, positions,
        scale=scale, sliding_window=sliding_window)


def write_kv(
    k_pages: jax.Array,  # [L, K, P, G, H]
    v_pages: jax.Array,
    layer: jax.Array | int,
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    slots: jax.Array,  # [B, T] flat slot page * G + offset; < 0 for padding
    *,
    kernels: Kernels,
) -> tuple[jax.Array, jax.Array]:
    """Store this step's keys and values in the cache pages."""
    check_kernels(kernels)
    return (_paged.write_pages(k_pages, layer, k, slots),
            _paged.write_pages(v_pages, layer, v, slots))
