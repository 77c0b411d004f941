"""KVPages: allocation, prefix hits, the last-token rule, LRU eviction, accounting."""

import numpy as np
import pytest

from jaxinfer.engine.kv_pages import KVPages


def toks(*ids):
    return np.asarray(ids, np.int32)


def test_allocate_grow_free_and_none_when_short():
    kv = KVPages(4, 4)
    assert kv.allocate(1, 5) == [0, 1]  # 5 tokens -> 2 pages
    assert kv.allocate(1, 8) == []  # still 2 pages
    assert kv.allocate(1, 9) == [2]
    assert kv.allocate(2, 8) is None and kv.pages(2) == []  # only 1 free: nothing taken
    assert kv.num_used == 3 and kv.num_free == 1
    kv.free(1)
    kv.check()
    assert kv.num_used == 0 and kv.num_free == 4


def test_prefix_hit_shares_pages_and_leaves_last_token():
    kv = KVPages(8, 4)
    a = toks(*range(1, 10))  # 9 tokens: 2 full blocks + 1
    kv.allocate(1, 9)
    kv.register(1, a, 9)
    assert kv.num_cached == 2
    pages, hashes = kv.lookup(a, 9)
    assert pages == kv.pages(1)[:2] and len(hashes) == 2
    kv.allocate(2, 9, hit=(pages, hashes))
    assert kv.pages(2)[:2] == kv.pages(1)[:2] and kv.pages(2)[2] != kv.pages(1)[2]
    assert kv.num_used == 4
    # A page-aligned prompt never hits its last block: the last token must be computed.
    b = toks(*range(1, 9))
    pages, _ = kv.lookup(b, 8)
    assert len(pages) == 1
    # A different block breaks the chain, even when later blocks are equal.
    c = toks(9, 9, 9, 9, 5, 6, 7, 8, 1)
    assert kv.lookup(c, 9) == ([], [])
    kv.free(1)
    kv.free(2)
    kv.check()
    assert kv.num_used == 0 and kv.num_cached == 2


def test_cached_pages_survive_free_until_evicted_lru():
    kv = KVPages(4, 2)
    a, b = toks(1, 2, 3, 4, 5), toks(7, 8, 9, 10, 11)
    kv.allocate(1, 5)
    kv.register(1, a, 5)  # 2 blocks cached
    kv.free(1)  # both evictable; the unregistered 3rd page returns to the free list
    assert kv.num_free == 4 and kv.num_cached == 2
    assert len(kv.lookup(a, 5)[0]) == 2
    kv.allocate(2, 5)  # needs 3: 2 never-registered free pages first, then evicts one
    kv.check()
    assert kv.num_cached == 1
    # Freed last-first, so the tail block (1, 2 -> 3, 4) was evicted and the head survives.
    assert len(kv.lookup(a, 5)[0]) == 1
    kv.register(2, b, 5)
    kv.free(2)
    kv.check()


def test_hit_on_evictable_pages_counts_them_out_of_free():
    kv = KVPages(3, 2)
    a = toks(1, 2, 3, 4, 5)
    kv.allocate(1, 5)
    kv.register(1, a, 5)
    kv.free(1)
    hit = kv.lookup(a, 5)
    assert len(hit[0]) == 2
    # 2 hit pages + 1 fresh = the whole pool; a 4th page is impossible.
    assert kv.allocate(2, 7, hit=hit) is None
    kv.check()
    assert kv.allocate(2, 5, hit=hit) == [kv.pages(2)[2]]
    assert kv.num_free == 0
    kv.free(2)
    kv.check()


def test_same_block_twice_first_writer_wins_and_reset():
    kv = KVPages(8, 2)
    a = toks(1, 2, 3)
    kv.allocate(1, 3)
    kv.allocate(2, 3)
    kv.register(1, a, 3)
    kv.register(2, a, 3)  # same content in a private page: not registered twice
    assert kv.num_cached == 1
    kv.reset_prefix_cache()
    assert kv.num_cached == 0 and kv.lookup(a, 3) == ([], [])
    kv.free(1)
    kv.free(2)
    kv.check()
    assert kv.num_free == 8


def test_double_free_is_detected():
    kv = KVPages(2, 2)
    kv.allocate(1, 2)
    kv._refs[kv.pages(1)[0]] = 0  # corrupt on purpose
    with pytest.raises(AssertionError):
        kv.check()


def test_disabled_prefix_cache_never_hits():
    kv = KVPages(4, 2, enable_prefix_cache=False)
    a = toks(1, 2, 3)
    kv.allocate(1, 3)
    kv.register(1, a, 3)
    assert kv.lookup(a, 3) == ([], []) and kv.num_cached == 0
    kv.free(1)
    kv.check()
