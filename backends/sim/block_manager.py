"""The simulated replica's paged KV block pool: free counts, prefix-cache hashes, LRU."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from cpsim.validation import check_non_negative


class BlockPool:
    """A pool of ``num_blocks`` KV blocks, as vLLM v1's block pool behaves, without block objects.

    A block is either *uncached free* (counted only), *cached* (registered under a prompt-block
    hash, with a reference count), or *private* (held by one request, counted by the request).
    Cached blocks whose reference count falls to 0 stay cached and become evictable; they are
    evicted least-recently-freed first, and only when a new block is needed and no uncached free
    block is left. (vLLM keeps uncached and cached free blocks in one queue; using the uncached
    ones first only postpones evictions.) ``num_free`` counts evictable cached blocks as free, as
    vLLM's usage metric does.
    """

    __slots__ = ("_lru", "_num_free_uncached", "_refcount", "num_blocks", "num_evictions")

    def __init__(self, num_blocks: int) -> None:
        check_non_negative("num_blocks", num_blocks, integer=True)
        self.num_blocks = int(num_blocks)
        self._num_free_uncached = self.num_blocks
        self._refcount: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # refcount-0 cached blocks, oldest first
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return self._num_free_uncached + len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._refcount)

    @property
    def usage_frac(self) -> float:
        if self.num_blocks == 0:
            return 0.0
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, num: int) -> None:
        """Take ``num`` new private blocks: uncached free blocks first, then evict LRU ones."""
        if num > self.num_free:
            raise RuntimeError(f"allocate({num}) with only {self.num_free} free blocks")
        take = num if num <= self._num_free_uncached else self._num_free_uncached
        self._num_free_uncached -= take
        rest = num - take
        if rest:
            lru, refcount = self._lru, self._refcount
            for _ in range(rest):
                block_hash, _ = lru.popitem(last=False)
                del refcount[block_hash]
            self.num_evictions += rest

    def release(self, num: int) -> None:
        """Return ``num`` private blocks to the uncached free pool."""
        self._num_free_uncached += num
        if self._num_free_uncached > self.num_blocks:
            raise RuntimeError(f"release({num}) would free more blocks than the pool has")

    def longest_hit(self, block_hashes: Sequence[int], max_blocks: int) -> int:
        """Number of leading hashes (at most ``max_blocks``) that are cached."""
        refcount = self._refcount
        num = 0
        for block_hash in block_hashes:
            if num >= max_blocks or block_hash not in refcount:
                break
            num += 1
        return num

    def num_evictable(self, block_hashes: Sequence[int]) -> int:
        """How many of these cached blocks are free now (acquiring them uses free blocks)."""
        refcount = self._refcount
        return sum(1 for block_hash in block_hashes if refcount[block_hash] == 0)

    def acquire(self, block_hashes: Sequence[int]) -> None:
        """Share cached blocks (a prefix hit): take a reference, leaving the LRU if unused."""
        refcount, lru = self._refcount, self._lru
        for block_hash in block_hashes:
            count = refcount[block_hash]
            if count == 0:
                del lru[block_hash]
            refcount[block_hash] = count + 1

    def register(self, block_hash: int) -> bool:
        """Cache one of the caller's private blocks under ``block_hash`` (its content is now
        computed). False when that hash is cached already: the block then stays private."""
        if block_hash in self._refcount:
            return False
        self._refcount[block_hash] = 1
        return True

    def release_cached(self, block_hashes: Sequence[int]) -> None:
        """Drop references; blocks that nobody uses become evictable. Freed in reverse order so
        that a request's tail blocks are evicted before its head blocks (as vLLM does)."""
        refcount, lru = self._refcount, self._lru
        for block_hash in reversed(block_hashes):
            count = refcount[block_hash] - 1
            refcount[block_hash] = count
            if count == 0:
                lru[block_hash] = None

    def evictable_hashes(self) -> list[int]:
        """Cached free blocks, next to be evicted first (for tests and inspection)."""
        return list(self._lru)

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._refcount

    def check(self) -> None:
        """Raise AssertionError when the pool's invariants are broken (tests)."""
        assert 0 <= self._num_free_uncached <= self.num_blocks
        assert 0 <= self.num_free <= self.num_blocks
        assert all(self._refcount[h] == 0 for h in self._lru)
        assert sum(1 for c in self._refcount.values() if c == 0) == len(self._lru)
        assert all(c >= 0 for c in self._refcount.values())
        used_cached = sum(1 for c in self._refcount.values() if c > 0)
        assert used_cached + self.num_free <= self.num_blocks
