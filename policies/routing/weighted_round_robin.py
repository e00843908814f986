"""Smooth weighted round robin (as in nginx): shares proportional to weights, evenly interleaved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cpsim.validation import check_positive
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import hint_miss


def capacity_weight(view: InstanceView) -> float:
    """gpu_count x max_concurrent_requests."""
    return float(view.gpu_count * view.max_concurrent_requests)


class WeightedRoundRobinRouter:
    """Each call, every candidate's running credit grows by its weight; the one with the most
    credit is picked (ties: hinted parallelism, then the earliest) and pays the sum of the
    candidates' weights. Weights come from ``weights`` (instance id -> weight), else from
    capacity; an instance missing from ``weights`` gets ``default_weight``. Only current
    candidates take part, so a full instance neither gains nor loses its turn."""

    name = "weighted_round_robin"

    def __init__(
        self, weights: Mapping[str, float] | None = None, default_weight: float = 1.0
    ) -> None:
        check_positive("default_weight", default_weight)
        if weights is not None:
            for iid, w in weights.items():
                check_positive(f"weights[{iid!r}]", w)
        self.weights = dict(weights) if weights is not None else None
        self.default_weight = default_weight
        self._credit: dict[str, float] = {}

    def weight(self, view: InstanceView) -> float:
        if self.weights is None:
            return capacity_weight(view)
        return float(self.weights.get(view.instance_id, self.default_weight))

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        total = 0.0
        for view in candidates:
            w = self.weight(view)
            total += w
            self._credit[view.instance_id] = self._credit.get(view.instance_id, 0.0) + w
        hint = request.parallelism_hint
        choice = min(
            candidates, key=lambda v: (-self._credit[v.instance_id], hint_miss(v, hint))
        )
        self._credit[choice.instance_id] -= total
        return choice
