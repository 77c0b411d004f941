import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import CapacityError, ConfigError
from sharding.data_parallel import ReplicaLayout, ReplicaPageAllocator, to_local_pages
from sharding.mesh import make_mesh
from sharding.spmd import mesh_context, shard_map


def test_layout_maps_slots_and_pages():
    lay = ReplicaLayout(dp=2, num_pages=8)
    assert [lay.replica_of_slot(s) for s in range(5)] == [0, 1, 0, 1, 0]
    assert lay.page_range(1) == range(4, 8) and lay.replica_of_page(5) == 1
    assert list(lay.slots_of_replica(1, 6)) == [1, 3, 5]
    # Device rows are replica-major; a slot keeps its replica in every bucket.
    assert lay.device_rows(4).tolist() == [0, 2, 1, 3]
    assert lay.device_rows(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    for b in (2, 4, 8):
        rows = lay.device_rows(b)
        assert (lay.slot_rows(b)[rows] == np.arange(b)).all()
        per = b // 2
        assert all(lay.replica_of_slot(int(slot)) == d // per for d, slot in enumerate(rows))
    with pytest.raises(ValueError, match="not a multiple"):
        lay.device_rows(3)
    with pytest.raises(ConfigError):
        ReplicaLayout(dp=3, num_pages=8)
    lay.check_block_tables([[0, 3], [4, 7], [1]])
    with pytest.raises(ValueError, match="slot 1 runs on dp replica 1"):
        lay.check_block_tables([[0], [2]])


def test_allocator_hands_out_replica_pages():
    alloc = ReplicaPageAllocator(ReplicaLayout(dp=2, num_pages=8))
    a = alloc.allocate(3, replica=1)
    b = alloc.allocate(2, replica=0)
    assert a == [4, 5, 6] and b == [0, 1]
    assert alloc.num_free_in(1) == 1 and alloc.num_free == 3 and alloc.num_used == 5
    with pytest.raises(CapacityError, match="replica 1"):
        alloc.allocate(2, replica=1)
    assert alloc.try_allocate(2, replica=1) is None
    alloc.share([5])
    assert alloc.refcount(5) == 2
    alloc.free(a + b + [5])
    assert alloc.num_used == 0
    alloc.check()
    with pytest.raises(ValueError, match="double free"):
        alloc.free([4])
    # dp=1 is the plain allocator: pages 0, 1, 2...
    assert ReplicaPageAllocator(ReplicaLayout(dp=1, num_pages=4)).allocate(3) == [0, 1, 2]


def test_to_local_pages_inside_shard_map():
    mesh = make_mesh("dp=2")
    # Global pool of 8 pages, 4 per replica, page size 4. Row 0 on replica 0, row 1 on 1.
    bt = jnp.asarray([[1, 3], [5, 6]], jnp.int32)
    slots = jnp.asarray([[1 * 4 + 2, -1], [6 * 4 + 1, 0]], jnp.int32)  # last: foreign page 0

    def body(bt, slots):
        return to_local_pages(bt, slots, pages_per_replica=4, page_size=4)

    spec = jax.sharding.PartitionSpec("dp")
    fn = shard_map(body, mesh, in_specs=(spec, spec), out_specs=(spec, spec), manual=("dp",))
    with mesh_context(mesh):
        local_bt, local_slots = jax.jit(fn)(bt, slots)
    assert np.asarray(local_bt).tolist() == [[1, 3], [1, 2]]
    assert np.asarray(local_slots).tolist() == [[6, -1], [2 * 4 + 1, -1]]
