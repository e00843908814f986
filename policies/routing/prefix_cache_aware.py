"""Prefix-cache-aware routing: the instance likely to hold the prompt prefix, weighed with load."""

from __future__ import annotations

from collections.abc import Sequence

from cpsim.validation import check_non_negative
from cpsim.views import InstanceView, RequestView
from policies.routing.prefix_index import PrefixCacheScorer, PrefixIndex
from policies.routing.scorers import LoadScorer, ScoringRouter


class PrefixCacheAwareRouter:
    """Score = (prefix_weight x expected prefix-hit fraction + load_weight x (1 - load)) /
    (prefix_weight + load_weight); the prefix term is dropped on candidates more than
    ``max_load_gap_frac`` busier than the least busy one. After each decision the
    request's block hashes are recorded for the chosen instance in an LRU of
    ``capacity_blocks`` blocks per instance (``block_size_tokens`` tokens per block, or one
    trace block id per block)."""

    name = "prefix_cache_aware"

    def __init__(
        self,
        block_size_tokens: int = 16,
        capacity_blocks: int = 100_000,
        prefix_weight: float = 1.0,
        load_weight: float = 1.0,
        max_load_gap_frac: float = 0.2,
    ) -> None:
        check_non_negative("prefix_weight", prefix_weight)
        check_non_negative("load_weight", load_weight)
        self.index = PrefixIndex(capacity_blocks)
        self.prefix_scorer = PrefixCacheScorer(self.index, block_size_tokens, max_load_gap_frac)
        self.scoring = ScoringRouter(
            [(self.prefix_scorer, prefix_weight), (LoadScorer(), load_weight)]
        )

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        choice = self.scoring.route(request, candidates, now)
        if choice is not None:
            self.index.record(choice.instance_id, self.prefix_scorer.block_hashes(request))
        return choice
