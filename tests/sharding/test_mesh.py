import jax
import pytest

from jaxinfer.errors import ConfigError
from sharding.mesh import make_mesh, parse_mesh
from sharding.rules import logical_to_spec


def test_parse_and_build():
    spec = parse_mesh("dp=2, tp=4")
    assert spec.shape == (2, 1, 4)
    mesh = make_mesh(spec)
    assert mesh.axis_names == ("dp", "pp", "tp") and mesh.devices.shape == (2, 1, 4)
    assert make_mesh("tp=2").devices.size == 2


@pytest.mark.parametrize("text,needle", [("tp=3x", "integer"), ("xx=2", "bad mesh item"),
                                         ("tp=2,tp=2", "twice"), ("tp=0", "positive"),
                                         ("dp=4,tp=4", "needs 16 devices")])
def test_bad_meshes(text, needle):
    assert len(jax.devices()) == 8
    with pytest.raises(ConfigError, match=needle):
        make_mesh(text)


def test_rules_map_and_reject_collisions():
    assert logical_to_spec(("embed", "heads", "head_dim")) == jax.sharding.PartitionSpec(None, "tp", None)
    with pytest.raises(ConfigError, match="both map"):
        logical_to_spec(("heads", "ffn"))
