"""Queue and SLO: scale out on a predicted SLO miss, in after a calm spell."""

from __future__ import annotations

import math

from cpsim.validation import check_non_negative, check_positive, check_range
from cpsim.views import PoolView


class QueueSLOScaler:
    """Out when the queue would take longer than ``max_queue_wait_s`` to drain at the pool's
    completion rate (a predicted SLO miss), or when the SLO attainment of the last interval
    fell below ``target_slo_attainment``: by ``step`` instances, or in proportion to how far
    the predicted wait overshoots (at most doubling), and not again while instances are
    still starting. In by one instance once utilization stayed below
    ``scale_in_utilization`` with an empty queue and the SLO met for ``scale_in_after_s``
    (hysteresis), at most once per ``cooldown_s``."""

    name = "queue_slo"

    def __init__(
        self,
        target_slo_attainment: float = 0.95,
        max_queue_wait_s: float = 5.0,
        scale_in_utilization: float = 0.4,
        scale_in_after_s: float = 120.0,
        cooldown_s: float = 60.0,
        step: int = 1,
        interval_s: float = 10.0,
    ) -> None:
        check_range("target_slo_attainment", target_slo_attainment, 0.0, 1.0)
        check_positive("max_queue_wait_s", max_queue_wait_s)
        check_range("scale_in_utilization", scale_in_utilization, 0.0, 1.0)
        check_non_negative("scale_in_after_s", scale_in_after_s)
        check_non_negative("cooldown_s", cooldown_s)
        check_positive("step", step, integer=True)
        check_positive("interval_s", interval_s)
        self.target_slo_attainment = target_slo_attainment
        self.max_queue_wait_s = max_queue_wait_s
        self.scale_in_utilization = scale_in_utilization
        self.scale_in_after_s = scale_in_after_s
        self.cooldown_s = cooldown_s
        self.step = step
        self.interval_s = interval_s
        self._calm_since: dict[str, float] = {}
        self._last_change: dict[str, float] = {}

    def predicted_wait_s(self, pool: PoolView) -> float:
        """How long the queue would take to drain at the last interval's completion rate."""
        if pool.queued == 0:
            return 0.0
        if pool.completions_per_s <= 0.0:
            return math.inf
        return pool.queued / pool.completions_per_s

    def target(self, pool: PoolView) -> int:
        current, now = pool.num_provisioned, pool.time_s
        wait = self.predicted_wait_s(pool)
        missing = (
            pool.slo_attainment is not None and pool.slo_attainment < self.target_slo_attainment
        )
        if wait > self.max_queue_wait_s or missing or (current == 0 and pool.queued):
            self._calm_since.pop(pool.pool, None)
            if pool.num_starting:  # help is on its way: wait for it before asking again
                return current
            overshoot = min(2.0, wait / self.max_queue_wait_s) if math.isfinite(wait) else 2.0
            self._last_change[pool.pool] = now
            return max(current + self.step, math.ceil(current * overshoot))
        calm = pool.queued == 0 and pool.utilization < self.scale_in_utilization and not missing
        if not calm:
            self._calm_since.pop(pool.pool, None)
            return current
        since = self._calm_since.setdefault(pool.pool, now)
        last = self._last_change.get(pool.pool, -math.inf)
        if now - since >= self.scale_in_after_s and now - last >= self.cooldown_s:
            self._last_change[pool.pool] = now
            return current - 1
        return current
