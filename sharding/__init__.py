"""Mesh construction and the logical-axis -> mesh-axis rules (the only place that writes
PartitionSpec)."""

from sharding.mesh import MeshSpec, make_mesh, parse_mesh
from sharding.rules import DEFAULT_RULES, constrain, logical_to_spec, named_sharding, tree_shardings

__all__ = [
    "DEFAULT_RULES", "MeshSpec", "constrain", "logical_to_spec", "make_mesh", "named_sharding",
    "parse_mesh", "tree_shardings",
]
