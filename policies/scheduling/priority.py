"""Strict priority with aging: CRITICAL first; a waiting request climbs a level per aging_s."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cpsim.protocols import Placement, Router
from cpsim.types import RequestPriority
from cpsim.validation import check_positive
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import pick_least_loaded
from policies.scheduling.base import BaseSchedulingPolicy


class PriorityPolicy(BaseSchedulingPolicy):
    """Order by effective priority, then arrival. The effective priority improves by one
    level per ``aging_s`` seconds waited (never past CRITICAL), so LOW cannot starve.

    Requests whose effective priority is CRITICAL or HIGH take the least loaded candidate
    themselves (fewest outstanding over capacity, then pending prefill, then KV usage);
    NORMAL and LOW go where the router says. Since ``order`` already puts the urgent ones
    first, they also get the first pick of free capacity."""

    name = "priority"

    def __init__(self, aging_s: float = 30.0) -> None:
        check_positive("aging_s", aging_s)
        self.aging_s = aging_s

    def effective_priority(self, request: RequestView, now: float) -> RequestPriority:
        waited_s = max(0.0, now - request.arrival_s)
        levels = 0 if math.isinf(self.aging_s) else int(waited_s // self.aging_s)
        return RequestPriority(max(int(RequestPriority.CRITICAL), int(request.priority) - levels))

    def order(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> Sequence[RequestView]:
        return sorted(
            queue, key=lambda r: (self.effective_priority(r, now), r.arrival_s, r.seq)
        )

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None:
        if self.effective_priority(request, now) > RequestPriority.HIGH:
            return super().place(request, candidates, router, now)
        choice = pick_least_loaded(candidates, request.parallelism_hint)
        return None if choice is None else Placement(choice.instance_id, policy=self.name)
