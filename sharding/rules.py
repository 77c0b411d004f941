"""Logical axis names -> mesh axes (STYLE.md rule 3).

Model code names only logical axes from `LOGICAL_AXES`; this table decides which mesh axis, if
any, each maps to:

- Tensor parallel, Megatron-style: q/k/v and gate/up are column-parallel (`heads`, `kv_heads`,
  `ffn` on `tp`), o and down are row-parallel (their input axis is `heads`/`ffn`, so each
  device holds a slice of rows and XLA ends each block with one all-reduce of the partial sums).
  The embedding and the LM head are split over `vocab` on `tp` (the lookup runs per tp shard,
  `jaxinfer.ops.embedding`, rather than as a gather GSPMD partitions).
- KV heads: split over `tp` when `num_kv_heads % tp == 0`; when there are fewer KV heads than
  `tp` (tp % K == 0) they are replicated on every tp device. This, and a vocabulary that `tp`
  does not divide, are the only cases where a mapped axis is dropped (`REPLICATED_IF_UNEVEN`);
  `sharding.mesh.check_model_fits` has already rejected every other uneven split, so anything
  else that does not divide is a bug and raises here.
- Data parallel: nothing here. A dp replica is a whole engine on its own slice of the mesh
  (`sharding.mesh.replica_meshes`), so inside an engine dp = 1 and no array maps to it.
- Pipeline parallel: the stacked `layers` axis of the weights and of the KV cache maps to `pp`,
  so each stage holds its layers and their cache (`sharding.pipeline`).

`pp` is run as a manual axis of a `shard_map` (the runner's step functions); `tp` stays an
automatic (GSPMD) axis. `constrain` therefore drops manual axes: inside the shard_map an
activation is already the local block of its pp stage.
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
    "batch": None,
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

# Logical axes replicated (rather than rejected) when their size is not a multiple of the mesh
# axis they map to: fewer KV heads than tp (Megatron's replicated KV heads), and vocabularies
# such as 32001 that tp does not divide.
REPLICATED_IF_UNEVEN = frozenset({"kv_heads", "vocab"})


def model_rules(cfg, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> Rules:
    """`rules` adjusted to one model on one mesh: KV heads and vocab replicated when tp does not
    divide them (`REPLICATED_IF_UNEVEN`). Use it for parameter and cache trees, whose shapes
    follow from `cfg`; activations get the same result from `constrain`'s shape check."""
    tp = dict(mesh.shape).get("tp", 1)
    out = dict(rules)
    if cfg.num_kv_heads % tp:
        out["kv_heads"] = None
    if cfg.vocab_size % tp:
        out["vocab"] = None
    return out


def logical_to_spec(names: Sequence[str | None], rules: Rules = DEFAULT_RULES,
                    mesh_axes: Sequence[str] | None = None, *,
                    shape: Sequence[int] | None = None,
                    axis_sizes: Mapping[str, int] | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec; raise if two names land on one mesh axis.

    Mesh axes absent from `mesh_axes` (when given) are dropped, so a rule table can name axes a
    particular mesh does not have (or axes that are manual in the current shard_map). With
    `shape` and `axis_sizes`, a dimension that its mesh axis does not divide is replicated if
    its name is in `REPLICATED_IF_UNEVEN` and raises ConfigError otherwise.
    """
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    out: list[str | None] = []
    used: dict[str, str] = {}
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise ConfigError(f"unknown logical axis {name!r} (known: {sorted(rules)})")
        axis = None if name is None else rules[name]
        if axis is not None and mesh_axes is not None and axis not in mesh_axes:
            axis = None
        if axis is not None and shape is not None and axis_sizes is not None:
            size = axis_sizes.get(axis, 1)
            if shape[i] % size:
                if name not in REPLICATED_IF_UNEVEN:
                    raise ConfigError(f"logical axis {name!r} of size {shape[i]} cannot be split "
                                      f"over mesh axis {axis}={size}")
                axis = None
        if axis is not None:
            if axis in used:
                raise ConfigError(
                    f"logical axes {used[axis]!r} and {name!r} both map to mesh axis {axis!r}")
            used[axis] = name
        out.append(axis)
    return PartitionSpec(*out)


def named_sharding(mesh: jax.sharding.Mesh, names: Sequence[str | None],
                   rules: Rules = DEFAULT_RULES, *, shape: Sequence[int] | None = None
                   ) -> NamedSharding:
    """NamedSharding of an array with logical axes `names` (and, if given, its shape)."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh.axis_names, shape=shape,
                                               axis_sizes=dict(mesh.shape)))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def tree_shardings(mesh: jax.sharding.Mesh, axes_tree, rules: Rules = DEFAULT_RULES,
                   shapes=None):
    """A tree of logical-axis tuples -> the same tree of NamedShardings.

    `shapes`, when given, is the same tree with arrays or ShapeDtypeStructs as leaves; it
    enables the uneven-size handling of `logical_to_spec` (e.g. KV heads fewer than tp).
    """
    if shapes is None:
        return jax.tree.map(lambda names: named_sharding(mesh, names, rules), axes_tree,
                            is_leaf=_is_axes)
    return jax.tree.map(lambda names, x: named_sharding(mesh, names, rules, shape=x.shape),
                        axes_tree, shapes, is_leaf=_is_axes)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op without a context mesh.

    Manual axes of an enclosing shard_map are left out (x is already their local block)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    auto = tuple(a for a in mesh.axis_names if a not in manual)
    if not auto:
        return x
    spec = logical_to_spec(names, rules, auto, shape=x.shape, axis_sizes=dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
