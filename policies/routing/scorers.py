"""Composable routing: scorers rate candidates in [0, 1], a weighted sum ranks, a picker picks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cpsim.validation import check_non_negative
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import effective_load, hint_miss, load_key

#: Scores closer than this count as equal, so the parallelism hint can break the tie.
SCORE_TIE_EPS = 1e-9


class Scorer(Protocol):
    """Rates every candidate in [0, 1], higher is better, one score per candidate in order."""

    def score(self, request: RequestView, candidates: Sequence[InstanceView]) -> list[float]: ...


class LoadScorer:
    """1 for an idle instance, 0 for one at (or above) capacity."""

    def score(self, request: RequestView, candidates: Sequence[InstanceView]) -> list[float]:
        return [max(0.0, 1.0 - effective_load(v)) for v in candidates]


class KVUsageScorer:
    """1 for an empty KV cache, 0 for a full one."""

    def score(self, request: RequestView, candidates: Sequence[InstanceView]) -> list[float]:
        return [min(1.0, max(0.0, 1.0 - v.kv_cache_usage_frac)) for v in candidates]


class PendingPrefillScorer:
    """1 for the candidate with no prompt tokens waiting for prefill, falling linearly to 0
    for the one with the most."""

    def score(self, request: RequestView, candidates: Sequence[InstanceView]) -> list[float]:
        most = max((v.pending_prefill_tokens for v in candidates), default=0)
        if most <= 0:
            return [1.0 for _ in candidates]
        return [1.0 - v.pending_prefill_tokens / most for v in candidates]


class MaxScorePicker:
    """Highest score; ties go to the hinted parallelism, then the less loaded, then the
    earliest candidate."""

    def pick(
        self, request: RequestView, candidates: Sequence[InstanceView], scores: Sequence[float]
    ) -> InstanceView | None:
        if not candidates:
            return None
        best = max(scores)
        tied = [v for v, s in zip(candidates, scores, strict=True) if best - s <= SCORE_TIE_EPS]
        return min(tied, key=lambda v: (hint_miss(v, request.parallelism_hint), load_key(v)))


class ScoringRouter:
    """Weighted sum of scorers (weights >= 0, not all 0), then the picker."""

    name = "scoring"

    def __init__(
        self,
        scorers: Sequence[tuple[Scorer, float]],
        picker: MaxScorePicker | None = None,
    ) -> None:
        if not scorers:
            raise ValueError("scorers=[] is not allowed; give at least one (scorer, weight)")
        for i, (_, weight) in enumerate(scorers):
            check_non_negative(f"scorers[{i}].weight", weight)
        total = sum(weight for _, weight in scorers)
        if total <= 0:
            raise ValueError(f"scorer weights sum to {total}; allowed: a sum > 0")
        self.scorers = list(scorers)
        self.total_weight = float(total)
        self.picker = picker or MaxScorePicker()

    def scores(self, request: RequestView, candidates: Sequence[InstanceView]) -> list[float]:
        """The weighted mean score of each candidate, in [0, 1]."""
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            if weight == 0:
                continue
            for i, s in enumerate(scorer.score(request, candidates)):
                totals[i] += weight * s
        return [t / self.total_weight for t in totals]

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        return self.picker.pick(request, candidates, self.scores(request, candidates))
