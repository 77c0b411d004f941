"""Parallelism over a `jax.sharding.Mesh` with axes ("dp", "pp", "tp"); the only package that
writes PartitionSpec.

- `mesh`: `--mesh dp=D,pp=P,tp=T` -> Mesh (multi-host aware device order), the one-line
  checks that a mesh fits the devices and the model, and its dp replicas as meshes of their
  own (each replica is a whole engine).
- `rules`: logical axis -> mesh axis table (Megatron TP, KV heads split or replicated, vocab on
  tp, batch and pages on dp, layers on pp) and `constrain` for activations.
- `spmd`: the shard_map (pp manual; tp automatic) the runner's steps run in.
- `pipeline`: GPipe (prefill) and cyclic multi-step decode schedules over pp stages.
- `multihost`: `jax.distributed` from flags or environment, one process per host.
"""

import importlib

_EXPORTS = {
    "MeshSpec": "mesh", "check_model_fits": "mesh", "make_mesh": "mesh", "parse_mesh": "mesh",
    "parse_mesh_list": "mesh", "replica_meshes": "mesh", "DEFAULT_RULES": "rules",
    "constrain": "rules", "logical_to_spec": "rules", "model_rules": "rules",
    "named_sharding": "rules", "tree_shardings": "rules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so that `sharding.multihost` (flags only) imports no JAX in the server's front.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sharding.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sharding' has no attribute {name!r}")
