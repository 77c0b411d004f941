"""The SPMD plumbing the runner's step functions use: `shard_map` with `pp` manual and `tp`
automatic, the specs it needs, and the mesh context for tracing.

Why partially manual. Tensor parallelism is expressed by shardings alone: weights carry their
logical axes and GSPMD inserts the Megatron all-reduces, so model code never names a mesh axis
(STYLE.md rule 3). Pipeline parallelism needs control that shardings cannot express: stages
must hand activations on in a schedule. So with pp > 1 the step function runs under
`shard_map` over pp: inside, arrays are the local stage's blocks and `sharding.pipeline` moves
data with `ppermute`; `tp` stays automatic. (Data-parallel replicas are separate engines, each
on its own dp slice of the mesh: `sharding.mesh.replica_meshes`.)

Kernels under tensor parallelism. A `pallas_call` is opaque to GSPMD, which would gather its
operands whole onto every device; `over_tp` runs such a function per tp shard instead (a
shard_map whose only manual axis is `tp`, nested inside the step's pp shard_map if there is
one), with the caller naming how each operand splits (`jaxinfer.ops` splits attention by heads).

Version guards: `jax.shard_map` (jax >= 0.7) with `axis_names`/`check_vma`, else
`jax.experimental.shard_map.shard_map` with `auto`/`check_rep`. The mesh context is
`jax.set_mesh` where it exists, else `jax.sharding.use_mesh`, else the Mesh itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from sharding.rules import logical_to_spec


def mesh_context(mesh: jax.sharding.Mesh) -> contextlib.AbstractContextManager:
    """Context in which `sharding.constrain` sees `mesh` while a step is traced."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):
        return jax.sharding.use_mesh(mesh)
    return mesh


def manual_part(spec: PartitionSpec, manual: Sequence[str]) -> PartitionSpec:
    """Keep only the manual axes of `spec` (entries may be one axis name or a tuple)."""
    out = []
    for entry in spec:
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n is not None and n in manual)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def specs_of(tree: Any, manual: Sequence[str]) -> Any:
    """shard_map specs for a tree of placed arrays (or NamedShardings): their manual part."""
    def one(a):
        sharding = a if isinstance(a, NamedSharding) else getattr(a, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return manual_part(sharding.spec, manual)
        return PartitionSpec()
    return jax.tree.map(one, tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array (outputs every process can read)."""
    return NamedSharding(mesh, PartitionSpec())


def shard_map(fn: Callable, mesh: jax.sharding.Mesh, in_specs: Any, out_specs: Any,
              manual: Sequence[str]) -> Callable:
    """`fn` run per block of the `manual` axes, the other mesh axes automatic."""
    manual = frozenset(manual)
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             axis_names=manual, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy_shard_map

    auto = frozenset(a for a in mesh.axis_names if a not in manual)
    return legacy_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                            check_rep=False, auto=auto)


def auto_tp() -> int | None:
    """While tracing under a context mesh: the tp size when `tp` is the only automatic axis of
    size > 1 (1: nothing is split automatically); None when another automatic axis is split
    (a function of local blocks cannot be run per tp shard there). Without a mesh: 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    split = {a: n for a, n in mesh.shape.items() if n > 1 and a not in manual}
    if not split:
        return 1
    return split["tp"] if set(split) == {"tp"} else None


def over_tp(fn: Callable, in_axes: Sequence[tuple[str | None, ...] | None],
            out_axes: tuple[str | None, ...]) -> Callable:
    """`fn` run on each tp shard of its operands under the context mesh. Operands and the
    result are named by logical axes (`sharding.rules`), of which only the `tp` mapping is used
    (a None entry: an absent operand); the other mesh axes stay as they are (manual in an
    enclosing shard_map, or of size 1)."""
    def spec(names):
        return None if names is None else logical_to_spec(names, mesh_axes=("tp",))

    return jax.shard_map(fn, in_specs=tuple(spec(a) for a in in_axes),
                         out_specs=spec(out_axes), axis_names={"tp"}, check_vma=False)
