"""Least outstanding work: requests over capacity, then pending prefill tokens, then KV usage."""

from __future__ import annotations

from collections.abc import Sequence

from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import pick_least_loaded


class LoadBalancedRouter:
    """Outstanding = the larger of the control plane's in-flight count and the engine's
    running + waiting, over ``max_concurrent_requests`` so that bigger instances take more."""

    name = "load_balanced"

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        return pick_least_loaded(candidates, request.parallelism_hint)
