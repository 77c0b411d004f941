"""A draft model proposes: any supported model with the target's vocabulary, its KV cache
paged like the target's.

The draft's cache has the target pool's geometry (pages, page size) and is indexed by the
target's block tables, so the one page allocator serves both and a prefix-cache hit shares the
draft's pages too. Its prefill runs inside the target's prefill step, on the same chunk.

Per slot the draft keeps `lens`: how many leading positions of its cache are valid. A
speculative step first feeds the draft the tokens from `lens` up to the row's last token (at
most CATCH_UP of them: usually 1, 2 after a step that kept every draft, more after plain
decode steps of an adaptive run), then k - 1 single tokens, drafting d_1..d_k. A row still
more than CATCH_UP tokens behind drafts nothing this step and catches up by CATCH_UP. Draft
quality never affects correctness: every draft is verified.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.kv_cache import PagedKVCache, cache_axes, init_cache, page_bytes, write_slots
from jaxinfer.sampling import greedy_tokens, sample, sampling_probs
from jaxinfer.speculative.api import (PrefillChunk, Proposal, ProposeInputs, Proposer,
                                      TargetInfo, fold, history_window)
from jaxinfer.speculative.config import SpeculativeConfig
from sharding.rules import model_rules, tree_shardings

logger = logging.getLogger(__name__)

CATCH_UP = 8  # tokens the draft may feed in its first pass of a step
DRAFT_SALT = 0x5EC2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftState:
    cache: PagedKVCache
    lens: jax.Array  # [S+1] int32: valid leading positions of the draft cache per slot


class DraftModelProposer(Proposer):
    """Drafts with a (small) Llama-family model of the target's vocabulary."""

    name = "draft_model"
    uses_history = True
    catch_up = CATCH_UP

    def __init__(self, cfg, graphdef, params, *, engine_cfg, mesh, kernels: str,
                 unroll_layers: int, name: str = "draft_model", shared_noise: bool = False
                 ) -> None:
        self.cfg, self.graphdef, self._params = cfg, graphdef, params
        # Coupled verification keeps a draft that equals the target's own sample: drawn with
        # the target's key at that position, the draft shares its noise and agrees more often.
        self.shared_noise = shared_noise
        self.mesh = mesh
        self.kernels, self.unroll_layers = kernels, unroll_layers
        self.name = name
        self.draft_vocab = cfg.vocab_size
        self.extra_page_bytes = page_bytes(cfg, engine_cfg, mesh)

    def params(self):
        return self._params

    def init_state(self, num_slots: int, engine_cfg) -> DraftState:
        shard = tree_shardings(self.mesh, cache_axes(engine_cfg),
                               model_rules(self.cfg, self.mesh))
        lens = jax.jit(lambda: jnp.zeros((num_slots + 1,), jnp.int32))()
        return DraftState(cache=init_cache(self.cfg, engine_cfg, shard), lens=lens)

    def _forward(self, params, cache, tokens, positions, bt, seq_lens, writes):
        model = nnx.merge(self.graphdef, params)
        hidden, cache = model(tokens, positions, cache, bt, seq_lens, writes,
                              kernels=self.kernels, unroll_layers=self.unroll_layers)
        return model, hidden, cache

    def prefill(self, params, state: DraftState, chunk: PrefillChunk) -> DraftState:
        _, _, cache = self._forward(params, state.cache, chunk.tokens, chunk.positions,
                                    chunk.block_tables, chunk.seq_lens, chunk.writes)
        real = chunk.seq_lens > 0
        lens = state.lens.at[chunk.slots].set(jnp.where(real, chunk.seq_lens,
                                                        state.lens[chunk.slots]))
        return DraftState(cache=cache, lens=lens)

    def _choose(self, logits, inputs: ProposeInputs, positions):
        """(token [B], q [B, V] or None) of the draft at `positions` [B]."""
        if inputs.sampling is None:
            return greedy_tokens(logits), None
        q = sampling_probs(logits, inputs.sampling)
        keys = (inputs.keys if self.shared_noise else
                jax.vmap(jax.random.key_data)(fold(inputs.keys, positions, DRAFT_SALT)))
        tok = sample(logits, inputs.sampling, keys, positions, use_sampling=True)
        return tok, q

    def propose(self, params, state: DraftState, inputs: ProposeInputs, k: int):
        g = inputs.page_size
        p, act, bt = inputs.positions, inputs.active, inputs.block_tables
        start = state.lens[inputs.slots]
        j = jnp.arange(CATCH_UP, dtype=jnp.int32)
        pos = start[:, None] + j[None, :]
        valid = act[:, None] & (pos <= p[:, None])
        toks = history_window(inputs.history, start, CATCH_UP)
        fed = jnp.where(valid, pos, p[:, None])
        seq_lens = jnp.where(act, jnp.minimum(start + CATCH_UP, p + 1), 0)
        model, hidden, cache = self._forward(params, state.cache, toks, fed, bt, seq_lens,
                                             write_slots(bt, pos, valid, g))
        caught = act & (p - start < CATCH_UP)
        last = jnp.clip(p - start, 0, CATCH_UP - 1)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        tok, q = self._choose(model.logits(h, kernels=self.kernels), inputs, p + 1)
        tokens, probs = [tok], [q]
        for i in range(1, k):
            pos_i = p + i
            w = write_slots(bt, pos_i[:, None], caught[:, None], g)
            model, hidden, cache = self._forward(params, cache, tok[:, None], pos_i[:, None],
                                                 bt, jnp.where(caught, pos_i + 1, 0), w)
            tok, q = self._choose(model.logits(hidden[:, 0], kernels=self.kernels), inputs,
                                  pos_i + 1)
            tokens.append(tok)
            probs.append(q)
        proposal = Proposal(tokens=jnp.stack(tokens, axis=1).astype(jnp.int32),
                            num_tokens=jnp.where(caught, k, 0).astype(jnp.int32),
                            probs=None if q is None else jnp.stack(probs, axis=1))
        return DraftState(cache=cache, lens=state.lens), proposal

    def commit(self, params, state: DraftState, inputs: ProposeInputs, accepted, k: int
               ) -> DraftState:
        p, act = inputs.positions, inputs.active
        start = state.lens[inputs.slots]
        caught = act & (p - start < CATCH_UP)
        # d_i sits at P + i in the draft cache and is valid when kept; d_k was never fed.
        new = jnp.where(caught, p + 1 + jnp.minimum(accepted, k - 1),
                        jnp.where(act, jnp.minimum(start + CATCH_UP, p + 1), start))
        return DraftState(cache=state.cache, lens=state.lens.at[inputs.slots].set(new))


def make(spec: SpeculativeConfig, target: TargetInfo) -> DraftModelProposer:
    from jaxinfer.config import model_source
    from jaxinfer.errors import ConfigError
    from jaxinfer.model_loader import load_model

    try:
        model_source(spec.model)
    except ConfigError:
        raise ConfigError(f"--speculative-config: draft model {spec.model!r} is not a "
                          "directory, a bundled model or a preset") from None
    loaded = load_model(spec.model, mesh=target.mesh, dtype=target.dtype)
    if loaded.cfg.vocab_size != target.model_cfg.vocab_size:
        raise ConfigError(f"--speculative-config: the draft {spec.model!r} has a vocabulary of "
                          f"{loaded.cfg.vocab_size} tokens, the target {target.model_cfg.vocab_size}")
    if loaded.cfg.context_limit < target.engine_cfg.max_seq_len:
        logger.warning("draft %s was trained for %d positions; sequences run to %d",
                       spec.model, loaded.cfg.context_limit, target.engine_cfg.max_seq_len)
    return DraftModelProposer(loaded.cfg, loaded.graphdef, loaded.params,
                              engine_cfg=target.engine_cfg, mesh=target.mesh,
                              kernels=target.kernels, unroll_layers=target.unroll_layers,
                              shared_noise=spec.acceptance == "coupled")
