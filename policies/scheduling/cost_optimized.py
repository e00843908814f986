"""Cost-optimized: the cheapest instance that meets the request's SLO and cost budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cpsim.latency import ObservedLatencyModel
from cpsim.protocols import LatencyModel, Placement, Router
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import hint_miss, load_key
from policies.scheduling.base import BaseSchedulingPolicy
from policies.scheduling.slo_aware import predicted_e2e_s


@dataclass(frozen=True, slots=True)
class CostOption:
    """What serving a request on one instance is predicted to cost and take."""

    instance: InstanceView
    e2e_s: float
    cost_usd: float


def predicted_cost_usd(instance: InstanceView, e2e_s: float) -> float:
    """The instance's whole price over the request's predicted lifetime: an upper bound, as
    batching shares the instance among the requests in flight."""
    return instance.cost_per_gpu_hour * instance.gpu_count * e2e_s / 3600.0


class CostOptimizedPolicy(BaseSchedulingPolicy):
    """Arrival order. Placement: among candidates whose predicted cost is within the
    request's ``cost_budget`` (no budget: all), the cheapest whose predicted end-to-end time
    fits the remaining slack (no SLO: all fit); if none fits the slack, the cheapest within
    budget; if none is within budget, a rejection naming the budget and the cheapest
    predicted cost. Ties: parallelism hint, then least loaded. The predicted cost is
    recorded on the placement."""

    name = "cost_optimized"

    def __init__(self, latency_model: LatencyModel | None = None) -> None:
        self.latency_model: LatencyModel = latency_model or ObservedLatencyModel()

    def options(self, request: RequestView, candidates: Sequence[InstanceView]) -> list[CostOption]:
        out = []
        for view in candidates:
            e2e_s = predicted_e2e_s(self.latency_model, request, view)
            out.append(CostOption(view, e2e_s, predicted_cost_usd(view, e2e_s)))
        return out

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None:
        options = self.options(request, candidates)
        if not options:
            return None
        hint = request.parallelism_hint

        def cheapest(pool: Sequence[CostOption]) -> CostOption:
            return min(
                pool, key=lambda o: (o.cost_usd, hint_miss(o.instance, hint), load_key(o.instance))
            )

        budget = request.cost_budget
        affordable = [o for o in options if budget is None or o.cost_usd <= budget]
        if not affordable:
            best = cheapest(options)
            return Placement(
                reject_reason=(
                    f"cost_budget={budget} USD is below the cheapest predicted cost "
                    f"{best.cost_usd:.6g} USD (instance {best.instance.instance_id})"
                ),
                predicted_cost_usd=best.cost_usd,
                policy=self.name,
            )
        deadline = request.deadline_s()
        slack_s = math.inf if deadline is None else deadline - now
        on_time = [o for o in affordable if o.e2e_s <= slack_s]
        best = cheapest(on_time or affordable)
        return Placement(
            best.instance.instance_id, predicted_cost_usd=best.cost_usd, policy=self.name
        )
