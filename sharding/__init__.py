"""Parallelism over a `jax.sharding.Mesh` with axes ("dp", "pp", "tp"); the only package that
writes PartitionSpec.

- `mesh`: `--mesh dp=D,pp=P,tp=T` -> Mesh (multi-host aware device order) and the one-line
  checks that a mesh fits the devices, the model and the engine.
- `rules`: logical axis -> mesh axis table (Megatron TP, KV heads split or replicated, vocab on
  tp, batch and pages on dp, layers on pp) and `constrain` for activations.
- `spmd`: the shard_map (dp, pp manual; tp automatic) the runner's steps run in.
- `pipeline`: GPipe (prefill) and cyclic multi-step decode schedules over pp stages.
- `data_parallel`: which replica owns a batch slot and a KV page; the per-replica allocator.
- `multihost`: `jax.distributed` from flags or environment, one process per host.
"""

from sharding.data_parallel import ReplicaLayout, ReplicaPageAllocator
from sharding.mesh import (MeshSpec, check_engine_fits, check_model_fits, fit_engine, make_mesh,
                           parse_mesh, parse_mesh_list)
from sharding.rules import (DEFAULT_RULES, constrain, logical_to_spec, model_rules, named_sharding,
                            tree_shardings)

__all__ = [
    "DEFAULT_RULES", "MeshSpec", "ReplicaLayout", "ReplicaPageAllocator", "check_engine_fits",
    "check_model_fits", "constrain", "fit_engine", "logical_to_spec", "make_mesh", "model_rules",
    "named_sharding", "parse_mesh", "parse_mesh_list", "tree_shardings",
]
