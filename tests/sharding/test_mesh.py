import dataclasses

import jax
import pytest

from jaxinfer.config import PRESETS
from jaxinfer.errors import ConfigError
from sharding.mesh import (MeshSpec, check_model_fits, device_grid, make_mesh, parse_mesh,
                           parse_mesh_list, replica_meshes)
from sharding.rules import logical_to_spec


def test_parse_and_build():
    spec = parse_mesh("dp=2, tp=4")
    assert spec.shape == (2, 1, 4)
    mesh = make_mesh(spec)
    assert mesh.axis_names == ("dp", "pp", "tp") and mesh.devices.shape == (2, 1, 4)
    assert make_mesh("tp=2").devices.size == 2
    assert MeshSpec.of(mesh) == spec
    assert parse_mesh_list("tp=1; tp=2;pp=2,tp=2;") == [MeshSpec(), MeshSpec(tp=2),
                                                         MeshSpec(pp=2, tp=2)]


@pytest.mark.parametrize("text,needle", [("tp=3x", "integer"), ("xx=2", "bad mesh item"),
                                         ("tp=2,tp=2", "twice"), ("tp=0", "positive"),
                                         ("dp=4,tp=4", "needs 16 devices but only 8")])
def test_bad_meshes(text, needle):
    assert len(jax.devices()) == 8
    with pytest.raises(ConfigError, match=needle):
        make_mesh(text)
    with pytest.raises(ConfigError, match="no mesh"):
        parse_mesh_list(" ; ")


def test_rules_map_and_reject_collisions():
    spec = logical_to_spec(("embed", "heads", "head_dim"))
    assert spec == jax.sharding.PartitionSpec(None, "tp", None)
    with pytest.raises(ConfigError, match="both map"):
        logical_to_spec(("heads", "ffn"))


# Shaped like the HF-parity test models: 8 heads, 2 KV heads, 4 layers, ffn 128.
CFG = dataclasses.replace(PRESETS["dummy"], num_heads=8, num_kv_heads=2, num_layers=4,
                          head_dim=8, hidden_size=64, intermediate_size=128, vocab_size=256)


@pytest.mark.parametrize("mesh", ["tp=2", "tp=4", "tp=8", "pp=2", "pp=4", "dp=2,pp=2,tp=2",
                                  "dp=8"])
def test_model_fits(mesh):
    check_model_fits(parse_mesh(mesh), CFG)


@pytest.mark.parametrize("mesh,cfg_change,message", [
    ("tp=3", {}, "mesh dp=1,pp=1,tp=3: tp=3 does not divide num_heads=8"),
    ("tp=4", {"intermediate_size": 130},
     "mesh dp=1,pp=1,tp=4: tp=4 does not divide intermediate_size=130"),
    ("tp=4", {"num_heads": 12, "num_kv_heads": 6},
     "mesh dp=1,pp=1,tp=4: tp=4 and num_kv_heads=6 do not fit"),
    ("pp=3", {}, "mesh dp=1,pp=3,tp=1: pp=3 does not divide num_layers=4"),
])
def test_model_does_not_fit(mesh, cfg_change, message):
    with pytest.raises(ConfigError) as e:
        check_model_fits(parse_mesh(mesh), dataclasses.replace(CFG, **cfg_change))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("mesh", ["dp=1", "dp=2", "dp=2,pp=2,tp=2", "dp=4,tp=2", "dp=8"])
def test_replica_meshes(mesh):
    """Each dp replica is a mesh of its own (dp = 1, the same pp x tp grid): replica r is
    plane r of the dp mesh, and the replicas split its devices without overlap. (Replacing
    `fit_engine`/`check_engine_fits`: an engine never splits its slots or pages over dp.)"""
    spec = parse_mesh(mesh)
    full = make_mesh(spec)
    subs = replica_meshes(full)
    assert len(subs) == spec.dp
    for r, sub in enumerate(subs):
        assert sub.axis_names == ("dp", "pp", "tp")
        assert MeshSpec.of(sub) == MeshSpec(pp=spec.pp, tp=spec.tp)
        assert (sub.devices[0] == full.devices[r]).all()
    ids = [d.id for sub in subs for d in sub.devices.flat]
    assert sorted(ids) == sorted(d.id for d in full.devices.flat)


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "fake"


@pytest.mark.parametrize("mesh,grid", [
    # Two hosts of 4 devices: hosts go to the outermost axis > 1, tp stays inside a host.
    ("pp=2,tp=4", [[[0, 1, 2, 3], [4, 5, 6, 7]]]),
    ("dp=2,pp=2,tp=2", [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]),
    ("pp=4,tp=2", [[[0, 1], [2, 3], [4, 5], [6, 7]]]),
])
def test_multihost_device_grid(mesh, grid):
    devices = [_FakeDevice(i, i // 4) for i in reversed(range(8))]  # any input order
    out = device_grid(parse_mesh(mesh), devices)
    assert [[[d.id for d in row] for row in plane] for plane in out] == grid
    for plane in out:  # every tp group lives on one host
        for row in plane:
            assert len({d.process_index for d in row}) == 1
