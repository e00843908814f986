"""SLO-aware: least slack first among requests that can still make their SLO, fastest instance."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cpsim.latency import ObservedLatencyModel
from cpsim.protocols import LatencyModel, Placement, Router
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import hint_miss, load_key
from policies.scheduling.base import BaseSchedulingPolicy


def predicted_e2e_s(model: LatencyModel, request: RequestView, instance: InstanceView) -> float:
    """Predicted end-to-end seconds of ``request`` if it started on ``instance`` now."""
    return model.predict(request, instance).e2e_s(request.max_tokens)


def serving_instances(
    request: RequestView, instances: Sequence[InstanceView]
) -> list[InstanceView]:
    """Healthy instances serving the request's model (any model when it names none)."""
    model = request.model_name
    return [v for v in instances if v.is_healthy and v.serves(model)]


class SLOAwarePolicy(BaseSchedulingPolicy):
    """Urgency = slack (deadline - now) minus the best predicted end-to-end time over the
    healthy instances serving the request (0 when none does).

    Order, in three bands: (1) SLO requests that can still make it (urgency >= 0), least
    urgency first, then earliest deadline, then arrival (least-laxity-first; equal to
    earliest-deadline-first when predicted service times are equal); (2) requests without an
    SLO, by arrival: they cannot miss, so they go before (3) SLO requests that can no longer
    make it, by arrival; those are demoted, not dropped, so they still finish (late) when
    capacity frees up, and they never push a request that can still make it past its deadline.

    Placement: an SLO request goes to the candidate with the lowest predicted end-to-end
    time (ties: parallelism hint, then least loaded); a request without an SLO goes where
    the router says, so the fastest instances stay free for requests that need them."""

    name = "slo_aware"

    def __init__(self, latency_model: LatencyModel | None = None) -> None:
        self.latency_model: LatencyModel = latency_model or ObservedLatencyModel()

    def urgency_s(
        self, request: RequestView, instances: Sequence[InstanceView], now: float
    ) -> float:
        """Slack minus best predicted service time; +inf without an SLO."""
        deadline = request.deadline_s()
        if deadline is None:
            return math.inf
        serving = serving_instances(request, instances)
        best = min((predicted_e2e_s(self.latency_model, request, v) for v in serving), default=0.0)
        return (deadline - now) - best

    def order(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> Sequence[RequestView]:
        feasible: list[tuple[float, float, int, RequestView]] = []
        no_slo: list[RequestView] = []
        infeasible: list[RequestView] = []
        for request in queue:
            deadline = request.deadline_s()
            if deadline is None:
                no_slo.append(request)
                continue
            urgency = self.urgency_s(request, instances, now)
            if urgency >= 0.0:
                feasible.append((urgency, deadline, request.seq, request))
            else:
                infeasible.append(request)
        feasible.sort(key=lambda item: item[:3])
        by_arrival = sorted(no_slo, key=lambda r: r.seq), sorted(infeasible, key=lambda r: r.seq)
        return [item[3] for item in feasible] + by_arrival[0] + by_arrival[1]

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None:
        if request.slo_deadline_ms is None:
            return super().place(request, candidates, router, now)
        if not candidates:
            return None
        hint = request.parallelism_hint
        choice = min(
            candidates,
            key=lambda v: (
                predicted_e2e_s(self.latency_model, request, v),
                hint_miss(v, hint),
                load_key(v),
            ),
        )
        return Placement(choice.instance_id, policy=self.name)
