"""Logical axis names -> mesh axes (STYLE.md rule 3).

Model code names only logical axes from `LOGICAL_AXES`; this table decides which mesh axis, if
any, each maps to. Megatron-style tensor parallelism: heads and ffn are split over `tp`
(column-parallel q/k/v and gate/up, row-parallel o and down); vocab over `tp`; the decode
batch over `dp`; stacked layers over `pp`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.errors import ConfigError

LOGICAL_AXES = (
    "batch", "seq", "embed", "heads", "kv_heads", "head_dim", "ffn", "vocab", "pages", "layers",
    "page_size",
)

Rules = Mapping[str, str | None]

DEFAULT_RULES: Rules = {
    "batch": "dp",
    "seq": None,
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "ffn": "tp",
    "vocab": "tp",
    "pages": None,
    "page_size": None,
    "layers": "pp",
}


def logical_to_spec(names: Sequence[str | None], rules: Rules = DEFAULT_RULES,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec; raise if two names land on one mesh axis.

    Mesh axes absent from `mesh_axes` (when given) are dropped, so a rule table can name axes a
    particular mesh does not have.
    """
    out: list[str | None] = []
    used: dict[str, str] = {}
    for name in names:
        if name is not None and name not in rules:
            raise ConfigError(f"unknown logical axis {name!r} (known: {sorted(rules)})")
        axis = None if name is None else rules[name]
        if axis is not None and mesh_axes is not None and axis not in mesh_axes:
            axis = None
        if axis is not None:
            if axis in used:
                raise ConfigError(f"logical axes {used[axis]!r} and {name!r} both map to mesh axis {axis!r}")
            used[axis] = name
        out.append(axis)
    return PartitionSpec(*out)


def named_sharding(mesh: jax.sharding.Mesh, names: Sequence[str | None],
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh.axis_names))


def tree_shardings(mesh: jax.sharding.Mesh, axes_tree, rules: Rules = DEFAULT_RULES):
    """A tree of logical-axis tuples -> the same tree of NamedShardings."""
    return jax.tree.map(lambda names: named_sharding(mesh, names, rules), axes_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op without a context mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.axis_names))
