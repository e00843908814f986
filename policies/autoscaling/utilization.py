"""Target utilization: the replicas that bring demand over capacity to a target (HPA's rule)."""

from __future__ import annotations

import math

from cpsim.validation import check_non_negative, check_positive, check_range
from cpsim.views import PoolView
from policies.autoscaling.base import StabilizedTarget


class TargetUtilizationScaler:
    """desired = ceil(provisioned x utilization / ``target_utilization``), where utilization
    is the pool's demand (requests in flight and queued) over the capacity of its
    provisioned instances (serving and starting, so a cold start in progress is not asked
    for again); left alone within ``tolerance`` of the target; scale-in waits out
    ``scale_in_window_s`` (the highest target of that window wins)."""

    name = "target_utilization"

    def __init__(
        self,
        target_utilization: float = 0.7,
        tolerance: float = 0.1,
        scale_in_window_s: float = 120.0,
        interval_s: float = 10.0,
    ) -> None:
        check_range("target_utilization", target_utilization, 0.01, 10.0)
        check_non_negative("tolerance", tolerance)
        check_positive("interval_s", interval_s)
        self.target_utilization = target_utilization
        self.tolerance = tolerance
        self.scale_in_window_s = scale_in_window_s
        self.interval_s = interval_s
        self._stabilized: dict[str, StabilizedTarget] = {}

    def target(self, pool: PoolView) -> int:
        current = pool.num_provisioned
        capacity = current * pool.max_concurrent_per_instance
        demand = pool.in_flight + pool.queued
        if capacity == 0:
            desired = 1 if demand else 0
        else:
            ratio = demand / capacity / self.target_utilization
            desired = current if abs(ratio - 1.0) <= self.tolerance else math.ceil(current * ratio)
        stabilize = self._stabilized.setdefault(pool.pool, StabilizedTarget(self.scale_in_window_s))
        return stabilize(desired, current, pool.time_s)
