"""A guess, per instance, of the prompt blocks it caches (from our routing), and its scorer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from cpsim.prefix import prompt_block_hashes
from cpsim.validation import check_positive, check_range
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import effective_load


class PrefixIndex:
    """Per instance, an LRU of block hashes holding at most ``capacity_blocks``: a guess at
    what the engine's prefix cache holds, built from our own routing decisions only."""

    def __init__(self, capacity_blocks: int = 100_000) -> None:
        check_positive("capacity_blocks", capacity_blocks, integer=True)
        self.capacity_blocks = capacity_blocks
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def record(self, instance_id: str, hashes: Sequence[int]) -> None:
        lru = self._blocks.setdefault(instance_id, OrderedDict())
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity_blocks:
            lru.popitem(last=False)

    def matched_blocks(self, instance_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` the instance is believed to hold. Hashes are chained,
        so the first miss ends the shared prefix."""
        lru = self._blocks.get(instance_id)
        if lru is None:
            return 0
        matched = 0
        for h in hashes:
            if h not in lru:
                break
            matched += 1
        return matched

    def num_blocks(self, instance_id: str) -> int:
        return len(self._blocks.get(instance_id, ()))


class PrefixCacheScorer:
    """Expected prefix-hit fraction (matched leading blocks over the request's full blocks),
    set to 0 on candidates more than ``max_load_gap_frac`` busier (``ranking.effective_load``)
    than the least busy one, so a hot prefix spills instead of piling onto one instance."""

    def __init__(
        self, index: PrefixIndex, block_size_tokens: int = 16, max_load_gap_frac: float = 0.2
    ) -> None:
        check_positive("block_size_tokens", block_size_tokens, integer=True)
        check_range("max_load_gap_frac", max_load_gap_frac, 0.0, float("inf"))
        self.index = index
        self.block_size_tokens = block_size_tokens
        self.max_load_gap_frac = max_load_gap_frac
        self._last: tuple[str, tuple[int, ...]] = ("", ())

    def block_hashes(self, request: RequestView) -> tuple[int, ...]:
        """The request's chained block hashes (the last request's are kept, as a router
        scores and then records the same request)."""
        if self._last[0] != request.request_id or not request.request_id:
            hashes = prompt_block_hashes(request.meta, self.block_size_tokens)
            self._last = (request.request_id, hashes)
        return self._last[1]

    def score(self, request: RequestView, candidates: Sequence[InstanceView]) -> list[float]:
        hashes = self.block_hashes(request)
        if not hashes or not candidates:
            return [0.0 for _ in candidates]
        least = min(effective_load(v) for v in candidates)
        scores = []
        for view in candidates:
            if effective_load(view) - least > self.max_load_gap_frac:
                scores.append(0.0)
            else:
                scores.append(self.index.matched_blocks(view.instance_id, hashes) / len(hashes))
        return scores
