import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfer.config import PRESETS
from jaxinfer.errors import ConfigError
from sharding.mesh import make_mesh
from sharding.rules import constrain, logical_to_spec, model_rules, named_sharding
from sharding.spmd import manual_part, mesh_context, shard_map

SIZES = {"dp": 2, "pp": 1, "tp": 4}


def test_uneven_kv_heads_and_vocab_replicate_others_raise():
    kv = ("layers", "kv_heads", "pages", "page_size", "head_dim")
    # pages (and batch) never map to dp: a dp replica is a whole engine with its own pool
    assert logical_to_spec(kv, shape=(4, 8, 16, 4, 8), axis_sizes=SIZES) == P(
        "pp", "tp", None, None, None)
    assert logical_to_spec(kv, shape=(4, 2, 16, 4, 8), axis_sizes=SIZES) == P(
        "pp", None, None, None, None)  # 2 KV heads on tp=4: replicated
    assert logical_to_spec(("batch", "seq", "embed"), axis_sizes=SIZES) == P(None, None, None)
    assert logical_to_spec(("vocab", "embed"), shape=(32001, 64), axis_sizes=SIZES) == P(None, None)
    with pytest.raises(ConfigError, match="'heads' of size 6 cannot be split over mesh axis tp=4"):
        logical_to_spec(("heads",), shape=(6,), axis_sizes=SIZES)
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("heads",), shape=(6, 2), axis_sizes=SIZES)


def test_model_rules():
    cfg = dataclasses.replace(PRESETS["dummy"], num_kv_heads=2, num_heads=8, vocab_size=502)
    mesh = make_mesh("tp=4")
    rules = model_rules(cfg, mesh)
    assert rules["kv_heads"] is None and rules["vocab"] is None and rules["heads"] == "tp"
    assert named_sharding(mesh, ("embed", "kv_heads"), rules).spec == P(None, None)
    assert model_rules(cfg, make_mesh("tp=2"))["kv_heads"] == "tp"


def test_manual_part():
    assert manual_part(P("pp", None, "tp", ("dp", "tp")), ("dp", "pp")) == P("pp", None, None, "dp")


def test_constrain_drops_manual_axes_inside_shard_map():
    """Inside a shard_map over pp, `layers` (-> pp) is already local; only tp is constrained."""
    mesh = make_mesh("pp=2,tp=4")
    seen = {}

    def body(x):
        y = constrain(x * 2, ("layers", "heads"))
        seen["manual"] = jax.sharding.get_abstract_mesh().manual_axes
        return y

    fn = shard_map(body, mesh, in_specs=(P("pp"),), out_specs=P("pp"), manual=("pp",))
    x = jnp.ones((4, 8))
    with mesh_context(mesh):
        out = jax.jit(fn)(x)
        hlo = jax.jit(fn).lower(x).as_text()
    assert (out == 2).all() and set(seen["manual"]) == {"pp"}
    assert "tp" in hlo  # the heads constraint reached the compiler, on the automatic axis
    assert constrain(x, ("batch", "heads")) is x  # no context mesh: a no-op
