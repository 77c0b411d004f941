"""The decoding-research interface: proposers, verifiers and the sampler, as pure functions
jitted into the engine's own programs (`jaxinfer.steps.speculative_step`).

A speculative step, per running row whose last token `t0` sits at position P (not yet in the
KV cache):

    state, proposal = proposer.propose(params, state, inputs, k)   # k draft tokens d_1..d_k
    logits = target([t0, d_1, ..., d_k] at P..P+k)                  # one verify pass, 1+k rows
    accepted, tokens = verifier(logits, proposal, sampler)          # a + 1 tokens out
    state = proposer.commit(params, state, inputs, accepted)

A proposer is a small object with static configuration (its fields are Python values, read at
trace time) and pure methods over device arrays; its device state (a draft model's KV cache,
per-slot counters) is a pytree the runner carries between steps and donates, like the
target's cache. To try an algorithm, write one file with a `Proposer` subclass and a factory
`make(spec: SpeculativeConfig, target: TargetInfo) -> Proposer`, then run it with
`--speculative-config '{"method": "my_pkg.my_file:make", "num_speculative_tokens": 3}'`
(docs/decoding.md walks through one). The scheduler, the page reservation, stops, penalties and
the verification rules need no change.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.errors import ConfigError
from jaxinfer.speculative.config import SpeculativeConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProposeInputs:
    """What a proposer sees of each of B rows (all device arrays)."""

    tokens: jax.Array  # [B] int32: the last token, at `positions`, not yet in the target cache
    positions: jax.Array  # [B] int32
    history: jax.Array  # [B, H] int32: the row's tokens at positions 0..positions (inclusive)
    block_tables: jax.Array  # [B, W] int32: the row's pages (a paged draft cache shares them)
    active: jax.Array  # [B] bool: the row decodes in this step
    slots: jax.Array  # [B] int32: the rows' slots (index per-slot proposer state)
    keys: jax.Array  # [B, 2] uint32: the rows' raw PRNG keys (fold in a position and a salt)
    sampling: Any  # jaxinfer.sampling.SamplingParams of the rows ([B] each)
    page_size: int = dataclasses.field(metadata=dict(static=True), default=16)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Proposal:
    """k draft tokens per row. `num_tokens` [B] says how many are real (the rest are
    ignored); `probs` [B, k, V] is the distribution each draft token was sampled from, or None
    when drafts are deterministic (one-hot q: n-gram lookup, greedy drafting)."""

    tokens: jax.Array  # [B, k] int32
    num_tokens: jax.Array  # [B] int32 in [0, k]
    probs: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillChunk:
    """A target prefill chunk, for proposers that keep a cache of their own."""

    tokens: jax.Array  # [R, T] int32
    positions: jax.Array  # [R, T] int32
    block_tables: jax.Array  # [R, W] int32
    seq_lens: jax.Array  # [R] int32 (0 for padding rows)
    writes: jax.Array  # [R, T] int32 flat cache slots, -1 = none
    slots: jax.Array  # [R] int32


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """What a proposer factory may use: the target model, the engine geometry and the mesh."""

    model_cfg: Any  # jaxinfer.config.ModelConfig
    engine_cfg: Any  # jaxinfer.config.EngineConfig (num_pages resolved)
    mesh: jax.sharding.Mesh
    graphdef: Any
    params: Any
    dtype: str
    kernels: str  # "reference" | "pallas", resolved
    unroll_layers: int


class Proposer:
    """Base proposer: no device state, no weights, no history; subclasses override."""

    name = "proposer"
    uses_history = False  # the engine keeps every slot's tokens on device (ProposeInputs.history)
    draft_vocab: int | None = None  # a vocabulary the engine checks against the target's
    extra_page_bytes = 0  # per KV page the proposer's own cache adds (pool sizing)
    # A proposer with a cache of its own that plain decode steps do not feed (a draft model)
    # catches up at most this many tokens per speculative step and drafts nothing for a row
    # further behind; adaptive depth rates such rows at one token. None: no lag (it reads
    # the history).
    catch_up: int | None = None

    def params(self) -> Any:
        """Device weights passed to every method (a pytree; {} for none)."""
        return {}

    def init_state(self, num_slots: int, engine_cfg: Any) -> Any:
        """Device state for `num_slots` slots + 1 scratch row, for the engine's resolved
        config (its page pool); device arrays, or None for none."""
        return None

    def prefill(self, params: Any, state: Any, chunk: PrefillChunk) -> Any:
        """Called inside every target prefill step with its chunk; returns the new state."""
        return state

    def propose(self, params: Any, state: Any, inputs: ProposeInputs, k: int
                ) -> tuple[Any, Proposal]:
        """Up to k drafts per row: (new state, Proposal). The one method every proposer must
        define (the base class has nothing to propose, so calling it here is an error)."""
        raise NotImplementedError(f"{type(self).__name__} does not define propose()")

    def commit(self, params: Any, state: Any, inputs: ProposeInputs, accepted: jax.Array,
               k: int) -> Any:
        """After verification: `accepted` [B] drafts of each row were kept (the row's new last
        token sits at positions + accepted + 1)."""
        return state


Factory = Callable[[SpeculativeConfig, TargetInfo], Proposer]


def load_factory(method: str) -> Factory:
    """`package.module:factory` -> the callable; a clear ConfigError when it is not there."""
    mod_name, _, attr = method.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"--speculative-config: cannot import {mod_name!r} for method "
                          f"{method!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--speculative-config: {mod_name} has no callable {attr!r}")
    return factory


def make_proposer(spec: SpeculativeConfig, target: TargetInfo) -> Proposer:
    """The proposer `spec.method` names (built in, or a plug-in's factory)."""
    if spec.is_plugin:
        factory = load_factory(spec.method)
    else:
        factory = load_factory({
            "ngram": "jaxinfer.speculative.ngram:make",
            "draft_model": "jaxinfer.speculative.draft_model:make",
            "layer_skip": "jaxinfer.speculative.layer_skip:make",
            "synthetic": "jaxinfer.speculative.synthetic:make",
        }[spec.method])
    proposer = factory(spec, target)
    if not isinstance(proposer, Proposer):
        raise ConfigError(f"--speculative-config: {spec.method} returned "
                          f"{type(proposer).__name__}, not a jaxinfer.speculative.Proposer")
    vocab = target.model_cfg.vocab_size
    if proposer.draft_vocab is not None and proposer.draft_vocab != vocab:
        raise ConfigError(f"--speculative-config: the draft's vocabulary ({proposer.draft_vocab}"
                          f" tokens) is not the target's ({vocab})")
    return proposer


def fold(keys: jax.Array, positions: jax.Array, salt: int) -> jax.Array:
    """Typed PRNG keys [B] from raw row keys [B, 2] uint32, a position [B] and a salt: the
    randomness of one decision about one position of one row (never of its batch mates)."""
    def one(kd, pos):
        return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(kd), pos), salt)

    return jax.vmap(one)(keys, positions)


def history_window(history: jax.Array, start: jax.Array, width: int) -> jax.Array:
    """history[b, start[b] : start[b] + width] for each row (clipped at the end), [B, width]."""
    h = history.shape[1]
    idx = jnp.clip(start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :], 0, h - 1)
    return jnp.take_along_axis(history, idx, axis=1)
