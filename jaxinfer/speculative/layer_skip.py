"""Layer-skip self-speculation (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al.
2023): the target's first N layers, its final norm and its head draft for the target itself.
No second model to train or load: a plug-in written against the research API in a few lines,
reusing the draft-model proposer with the target's own (sliced) weights.

    --speculative-config '{"method": "layer_skip", "num_layers": 4, "num_speculative_tokens": 3}'

The drafting layers get a KV cache of their own (N layers of the target pool's geometry), so
the draft's keys and values at rejected positions never touch the target's cache.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxinfer.errors import ConfigError
from jaxinfer.speculative.api import TargetInfo
from jaxinfer.speculative.config import SpeculativeConfig
from jaxinfer.speculative.draft_model import DraftModelProposer


def make(spec: SpeculativeConfig, target: TargetInfo) -> DraftModelProposer:
    from jaxinfer.model_loader import param_shardings

    n = spec.num_layers
    cfg = target.model_cfg
    if n >= cfg.num_layers:
        raise ConfigError(f"--speculative-config: layer_skip num_layers ({n}) must be below the "
                          f"target's {cfg.num_layers} layers")
    draft_cfg = dataclasses.replace(cfg, num_layers=n)
    graphdef, _ = param_shardings(draft_cfg, target.mesh, target.params["embed"].dtype)
    params = dict(target.params)
    params["layers"] = jax.tree.map(lambda x: x[:n], target.params["layers"])
    return DraftModelProposer(draft_cfg, graphdef, params, engine_cfg=target.engine_cfg,
                              mesh=target.mesh, kernels=target.kernels,
                              unroll_layers=target.unroll_layers, name="layer_skip",
                              shared_noise=spec.acceptance == "coupled")
