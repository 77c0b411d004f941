"""KV page ownership, the engine's one page allocator: pages per sequence plus the prefix cache.

The device only ever sees block tables; which sequence owns which page is decided here, on the
host (STYLE.md rule 10, after vLLM's KVCacheManager).

Prefix cache. A page that holds a full block of G known tokens whose keys and values have been
(or are being) written is registered under a chained block key: `(parent_hash, tokens)`, where
`parent_hash` is the hash of the previous block's key (0 for the first). Equal keys mean equal
prefixes up to a 64-bit collision of the parent hash, and the tokens themselves are compared by
the dict, so a hit is a true prefix hit. A new sequence looks its prompt up block by block and
shares the pages it finds, copy-free, with a reference count. Rules that keep it correct:

- Only full blocks are shared, and a full block is never written again, so a page being written
  is never shared.
- The last prompt token is always computed (its logits produce the first sample), so a lookup
  never covers the whole prompt: when every block of a page-aligned prompt is cached, the last
  block is recomputed into a fresh page.
- A page whose reference count drops to zero keeps its key and waits, least recently freed
  first, in the evictable list; allocation takes never-registered free pages first and evicts
  only when those run out. A sequence frees its pages last-first, so a shared prefix's head
  outlives its tail.
- Device steps run in dispatch order, so a page may be freed and handed to another sequence
  while an older step that writes it is still in flight: that write lands first.

Nothing here is thread-safe; the engine core's loop (its scheduler) owns it.
"""

from __future__ import annotations

import collections
import logging

import numpy as np

logger = logging.getLogger(__name__)


class KVPages:
    """Reference-counted page pool with per-sequence page lists and a prefix cache.

    Args:
        num_pages: pages in the device pool.
        page_size: tokens per page (G).
        enable_prefix_cache: share full prompt blocks between sequences.
    """

    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_cache: bool = True
                 ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self._refs = np.zeros(num_pages, np.int32)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() gives 0, 1, 2, ...
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._cached: dict[tuple[int, bytes], int] = {}  # block key -> page
        self._page_key: dict[int, tuple[int, bytes]] = {}  # page -> its block key
        self._seq_pages: dict[int, list[int]] = {}
        self._seq_hashes: dict[int, list[int]] = {}  # chain hashes of the seq's full blocks
        self.hit_tokens = 0
        self.lookup_tokens = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages an allocation can take: never-registered free pages plus evictable ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages held by at least one sequence."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache (held or evictable)."""
        return len(self._page_key)

    def pages(self, seq_id: int) -> list[int]:
        """The sequence's pages in order (its block table); empty when it holds none."""
        return self._seq_pages.get(seq_id, [])

    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    # -- prefix lookup -------------------------------------------------------------------
    def lookup(self, tokens: np.ndarray, num_tokens: int) -> tuple[list[int], list[int]]:
        """Longest cached prefix of `tokens[:num_tokens]` in full blocks, leaving at least the
        last token to compute. Returns (pages, chain hashes).

        Args:
            tokens: int32 token ids [>= num_tokens].
            num_tokens: tokens of the sequence known so far.
        """
        if not self.enable_prefix_cache:
            return [], []
        g = self.page_size
        pages: list[int] = []
        hashes: list[int] = []
        parent = 0
        for j in range((num_tokens - 1) // g):
            key = (parent, tokens[j * g:(j + 1) * g].tobytes())
            page = self._cached.get(key)
            if page is None:
                break
            pages.append(page)
            parent = hash(key)
            hashes.append(parent)
        return pages, hashes

    def record_lookup(self, hit_tokens: int, num_tokens: int) -> None:
        """Count an admission's lookup toward the hit rate."""
        self.hit_tokens += hit_tokens
        self.lookup_tokens += num_tokens

    # -- allocation ----------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int, *, hit: tuple[list[int], list[int]] | None
                 = None) -> list[int] | None:
        """Make `seq_id` hold pages for positions [0, num_tokens). On its first allocation
        `hit` (from `lookup`) gives the shared prefix pages. Returns the fresh pages taken
        (possibly none), or None when the pool cannot supply them (nothing changes)."""
        held = self._seq_pages.get(seq_id)
        hit_pages, hit_hashes = hit if hit is not None else ([], [])
        if held is None:
            held = []
        elif hit_pages:
            raise ValueError(f"sequence {seq_id} already holds pages; a prefix hit comes first")
        have = len(held) + len(hit_pages)
        need = -(-num_tokens // self.page_size) - have
        if need <= 0 and not hit_pages:
            self._seq_pages.setdefault(seq_id, held)
            return []
        # Hit pages that sit in the evictable list are not free for this allocation.
        available = self.num_free - sum(1 for p in hit_pages if self._refs[p] == 0)
        if need > available:
            return None
        for p in hit_pages:
            if self._refs[p] == 0:
                del self._evictable[p]
            self._refs[p] += 1
        fresh = [self._take() for _ in range(max(need, 0))]
        self._seq_pages[seq_id] = held + hit_pages + fresh
        if hit_pages:
            self._seq_hashes[seq_id] = list(hit_hashes)
        return fresh

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._evictable.popitem(last=False)  # least recently freed
            del self._cached[self._page_key.pop(page)]
        self._refs[page] = 1
        return page

    def register(self, seq_id: int, tokens: np.ndarray, num_ready: int) -> None:
        """Register the sequence's full blocks within positions [0, num_ready): tokens known
        and keys/values written by dispatched steps. A block already cached under another page
        stays private to this sequence (first writer wins)."""
        if not self.enable_prefix_cache:
            return
        g = self.page_size
        pages = self._seq_pages.get(seq_id)
        if pages is None:
            return
        hashes = self._seq_hashes.setdefault(seq_id, [])
        full = min(num_ready // g, len(pages))
        for j in range(len(hashes), full):
            parent = hashes[-1] if hashes else 0
            key = (parent, tokens[j * g:(j + 1) * g].tobytes())
            page = pages[j]
            if key not in self._cached and page not in self._page_key:
                self._cached[key] = page
                self._page_key[page] = key
            hashes.append(hash(key))

    def free(self, seq_id: int) -> None:
        """Drop the sequence's reference to each of its pages, last page first; registered
        pages reaching zero become evictable (still hit-able), others return to the pool."""
        pages = self._seq_pages.pop(seq_id, [])
        self._seq_hashes.pop(seq_id, None)
        for p in reversed(pages):
            if self._refs[p] <= 0:
                raise AssertionError(f"page {p} freed with refcount {self._refs[p]}")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._page_key:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after a failed device step the pages' contents are
        unknown). Pages still held stay held, but are no longer shared with newcomers."""
        for p in list(self._evictable):
            self._free.append(p)
        self._evictable.clear()
        self._cached.clear()
        self._page_key.clear()
        for hashes in self._seq_hashes.values():
            hashes.clear()
        self._seq_hashes.clear()

    # -- invariants ----------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError when the accounting is inconsistent (tests call this)."""
        refs = np.zeros(self.num_pages, np.int64)
        for pages in self._seq_pages.values():
            for p in pages:
                refs[p] += 1
        if not np.array_equal(refs, self._refs):
            bad = np.nonzero(refs != self._refs)[0][:5].tolist()
            raise AssertionError(f"refcounts disagree with sequence page lists at pages {bad}")
        free, evict = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & evict:
            raise AssertionError("a page is listed free twice")
        for p in range(self.num_pages):
            idle = self._refs[p] == 0
            if idle != (p in free or p in evict):
                raise AssertionError(f"page {p}: refcount {self._refs[p]}, free={p in free}, "
                                     f"evictable={p in evict}")
            if p in evict and p not in self._page_key:
                raise AssertionError(f"evictable page {p} has no block key")
            if p in free and p in self._page_key:
                raise AssertionError(f"free page {p} still has a block key")
        for key, p in self._cached.items():
            if self._page_key.get(p) != key:
                raise AssertionError(f"cached block of page {p} is not its key")
