"""Defaults shared by scheduling policies: keep the order given, place where the router says."""

from __future__ import annotations

from collections.abc import Sequence

from cpsim.protocols import Placement, Router
from cpsim.views import InstanceView, RequestView


class BaseSchedulingPolicy:
    """Arrival order, router placement, nothing observed. Subclasses override what differs."""

    name = "base"

    def order(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> Sequence[RequestView]:
        return queue

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None:
        choice = router.route(request, candidates, now)
        return None if choice is None else Placement(choice.instance_id, policy=self.name)

    def observe(self, request: RequestView, slo_met: bool | None, now: float) -> None:
        return None
