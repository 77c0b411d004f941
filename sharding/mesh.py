"""`--mesh dp=D,pp=P,tp=T` -> a `jax.sharding.Mesh` with axes ("dp", "pp", "tp")."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np

from jaxinfer.errors import ConfigError

MESH_AXES = ("dp", "pp", "tp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSpec:
    dp: int = 1
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"mesh {name} must be a positive integer, got {getattr(self, name)!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.dp, self.pp, self.tp)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return ",".join(f"{n}={getattr(self, n)}" for n in MESH_AXES)


def parse_mesh(text: str) -> MeshSpec:
    """Parse "dp=2,tp=4" (missing axes are 1)."""
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"bad mesh item {part!r}: expected dp=N, pp=N or tp=N")
        if name in values:
            raise ConfigError(f"mesh axis {name!r} given twice in {text!r}")
        try:
            values[name] = int(value)
        except ValueError:
            raise ConfigError(f"mesh axis {name!r} needs an integer, got {value!r}") from None
    return MeshSpec(**values)


def make_mesh(spec: MeshSpec | str = MeshSpec(), devices: Sequence[jax.Device] | None = None):
    """Build the mesh over `devices` (default: all devices, in JAX's multi-host-aware order)."""
    if isinstance(spec, str):
        spec = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    if spec.size > len(devices):
        raise ConfigError(
            f"mesh {spec} needs {spec.size} devices but only {len(devices)} are available"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if spec.size == len(devices):
        return jax.make_mesh(spec.shape, MESH_AXES, axis_types, devices=devices)
    grid = np.asarray(devices[: spec.size], dtype=object).reshape(spec.shape)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
