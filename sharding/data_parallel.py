"""Data parallelism: which replica owns a batch slot and a KV page.

With `dp` replicas the batch axis and the page pool are both sharded over `dp`
(`sharding.rules`): replica r holds pages `[r * P/dp, (r + 1) * P/dp)` and runs its own share
of the batch rows; a step never moves data between replicas. A sequence must therefore keep its
pages on the replica that runs its row.

Slots are assigned to replicas round-robin, `replica = slot % dp`, not in contiguous blocks. A
block layout would tie a slot's replica to the batch bucket (slot 2 of a bucket of 4 is on
replica 1 with dp=2, but on replica 0 in a bucket of 8), so a sequence would change replica
when the batch grows. Round-robin is the same in every bucket, and a scheduler that fills the
lowest free slots spreads requests evenly over the replicas for free.

The device still wants each replica's rows contiguous (that is what sharding an axis means),
so the runner permutes rows between slot order (host, API) and device order (replica-major):
`device_rows(batch)[d]` is the slot held by device row d. The permutation is host-side numpy on
the way in and one gather of the step's outputs on the way out; the runner hides it.

For the serving scheduler (`serve/`):

    layout = runner.layout                   # ReplicaLayout(dp, num_pages)
    r = layout.replica_of_slot(slot)         # which replica runs this slot
    layout.page_range(r)                     # the pages it may use (global page ids)
    layout.slots_of_replica(r, max_slots)    # its slots, to balance load per replica
    alloc = ReplicaPageAllocator(layout)     # or one allocator per page_range
    pages = alloc.try_allocate(n, replica=r) # None when replica r is out of pages

Page ids stay global everywhere on the host (block tables hold global ids); the step turns them
into replica-local ids on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import CapacityError, ConfigError
from jaxinfer.kv_cache import PageAllocator


@dataclasses.dataclass(frozen=True)
class ReplicaLayout:
    """How `dp` replicas share the batch slots and the `num_pages` KV pages."""

    dp: int
    num_pages: int

    def __post_init__(self) -> None:
        if self.dp < 1 or self.num_pages % self.dp:
            raise ConfigError(f"dp={self.dp} must be >= 1 and divide num_pages={self.num_pages}")

    @property
    def pages_per_replica(self) -> int:
        return self.num_pages // self.dp

    def replica_of_slot(self, slot: int) -> int:
        """The replica that runs batch slot `slot` (the same in every batch bucket)."""
        return slot % self.dp

    def slots_of_replica(self, replica: int, num_slots: int) -> range:
        """The slots below `num_slots` that replica `replica` runs."""
        return range(replica, num_slots, self.dp)

    def page_range(self, replica: int) -> range:
        """Global ids of the pages replica `replica` owns."""
        if not 0 <= replica < self.dp:
            raise ValueError(f"replica {replica} outside [0, {self.dp})")
        per = self.pages_per_replica
        return range(replica * per, (replica + 1) * per)

    def replica_of_page(self, page: int) -> int:
        return page // self.pages_per_replica

    def device_rows(self, batch: int) -> np.ndarray:
        """[batch] slot held by each device row: replica-major, each replica's rows in slot
        order. `batch` must be a multiple of dp."""
        if batch % self.dp:
            raise ValueError(f"batch {batch} is not a multiple of dp={self.dp}")
        per = batch // self.dp
        d = np.arange(batch)
        return ((d % per) * self.dp + d // per).astype(np.int32)

    def slot_rows(self, batch: int) -> np.ndarray:
        """[batch] device row of each slot (the inverse of `device_rows`)."""
        return np.argsort(self.device_rows(batch)).astype(np.int32)

    def check_block_tables(self, block_tables: Sequence[Sequence[int]]) -> None:
        """Raise ValueError if slot i's block table holds a page of another replica."""
        if self.dp == 1:
            return
        for slot, pages in enumerate(block_tables):
            r = self.replica_of_slot(slot)
            rng = self.page_range(r)
            foreign = [p for p in pages if p not in rng]
            if foreign:
                raise ValueError(f"slot {slot} runs on dp replica {r} (pages {rng.start}.."
                                 f"{rng.stop - 1}) but its block table holds pages {foreign[:4]}")


class ReplicaPageAllocator:
    """One `PageAllocator` per replica behind global page ids.

    With dp=1 it behaves exactly like `PageAllocator` (pages 0, 1, 2, ...)."""

    def __init__(self, layout: ReplicaLayout) -> None:
        self.layout = layout
        self._pools = [PageAllocator(layout.pages_per_replica) for _ in range(layout.dp)]

    @property
    def num_pages(self) -> int:
        return self.layout.num_pages

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self._pools)

    @property
    def num_used(self) -> int:
        return sum(p.num_used for p in self._pools)

    def num_free_in(self, replica: int) -> int:
        return self._pools[replica].num_free

    def _split(self, pages: Iterable[int]) -> dict[int, list[int]]:
        per, out = self.layout.pages_per_replica, {}
        for p in pages:
            if not 0 <= p < self.layout.num_pages:
                raise ValueError(f"double free or foreign page {p}")
            out.setdefault(p // per, []).append(p % per)
        return out

    def allocate(self, n: int, *, replica: int = 0) -> list[int]:
        """Take `n` fresh pages of replica `replica`; CapacityError (taking none) if short."""
        try:
            local = self._pools[replica].allocate(n)
        except CapacityError as e:
            raise CapacityError(f"dp replica {replica}: {e}") from None
        base = replica * self.layout.pages_per_replica
        return [base + p for p in local]

    def try_allocate(self, n: int, *, replica: int = 0) -> list[int] | None:
        return self.allocate(n, replica=replica) if n <= self.num_free_in(replica) else None

    def share(self, pages: Iterable[int]) -> None:
        for r, local in self._split(pages).items():
            self._pools[r].share(local)

    def free(self, pages: Iterable[int]) -> None:
        for r, local in self._split(pages).items():
            self._pools[r].free(local)

    def refcount(self, page: int) -> int:
        per = self.layout.pages_per_replica
        return self._pools[page // per].refcount(page % per)

    def check(self) -> None:
        for pool in self._pools:
            pool.check()


def to_local_pages(block_tables: jax.Array, slots: jax.Array | None, *, pages_per_replica: int,
                   page_size: int, axis: str = "dp") -> tuple[jax.Array, jax.Array | None]:
    """Inside a shard_map over dp: global page ids -> this replica's local ids.

    block_tables [B, W] are clipped into the local pool (entries past a row's length are padding
    and only need to be valid indices); slots [B, T] (page * G + offset, < 0 = padding) of
    another replica become -1 or fall past the pool, so their writes are dropped.
    """
    base = jax.lax.axis_index(axis) * pages_per_replica
    local_bt = jnp.clip(block_tables - base, 0, pages_per_replica - 1)
    if slots is None:
        return local_bt, None
    shifted = slots - base * page_size
    return local_bt, jnp.where((slots >= 0) & (shifted >= 0), shifted, -1)
