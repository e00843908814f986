"""Predictive: the arrival rate one cold start ahead (Holt's linear trend) over what an
instance serves."""

from __future__ import annotations

import math

from cpsim.validation import check_positive, check_range
from cpsim.views import PoolView
from policies.autoscaling.base import StabilizedTarget


class PredictiveScaler:
    """Forecasts each pool's arrival rate ``horizon_s`` ahead (about a cold start: what an
    instance started now must serve) by Holt's double exponential smoothing (``alpha`` the
    level's smoothing, ``beta`` the trend's), and provisions for the larger of that and the
    rate now, plus the queue drained over the horizon, at ``target_utilization`` of what an
    instance serves: ``instance_rps`` if given, else Little's law on what the pool shows
    (requests one instance holds at once over the mean latency of those that completed).
    Scale-in waits out ``scale_in_window_s`` (the highest target of that window wins)."""

    name = "predictive"

    def __init__(
        self,
        horizon_s: float = 120.0,
        alpha: float = 0.5,
        beta: float = 0.3,
        target_utilization: float = 0.7,
        instance_rps: float | None = None,
        scale_in_window_s: float = 120.0,
        interval_s: float = 10.0,
    ) -> None:
        check_positive("horizon_s", horizon_s)
        check_range("alpha", alpha, 0.0, 1.0)
        check_range("beta", beta, 0.0, 1.0)
        check_range("target_utilization", target_utilization, 0.01, 1.0)
        if instance_rps is not None:
            check_positive("instance_rps", instance_rps)
        check_positive("interval_s", interval_s)
        self.horizon_s = horizon_s
        self.alpha = alpha
        self.beta = beta
        self.target_utilization = target_utilization
        self.instance_rps = instance_rps
        self.scale_in_window_s = scale_in_window_s
        self.interval_s = interval_s
        self._level: dict[str, float] = {}
        self._trend: dict[str, float] = {}
        self._served_rps: dict[str, float] = {}  # what one instance served, last known
        self._stabilized: dict[str, StabilizedTarget] = {}

    def forecast_rps(self, pool: PoolView) -> float:
        """Update the pool's level and trend with the last interval's arrival rate and
        return the rate ``horizon_s`` ahead (never negative)."""
        rate, name = pool.arrivals_per_s, pool.pool
        if name not in self._level:
            self._level[name], self._trend[name] = rate, 0.0
        else:
            level, trend = self._level[name], self._trend[name]
            new_level = self.alpha * rate + (1.0 - self.alpha) * (level + trend)
            self._trend[name] = self.beta * (new_level - level) + (1.0 - self.beta) * trend
            self._level[name] = new_level
        steps = self.horizon_s / pool.interval_s
        return max(0.0, self._level[name] + self._trend[name] * steps)

    def per_instance_rps(self, pool: PoolView) -> float | None:
        if self.instance_rps is not None:
            return self.instance_rps
        if pool.mean_latency_s > 0.0:
            self._served_rps[pool.pool] = pool.max_concurrent_per_instance / pool.mean_latency_s
        return self._served_rps.get(pool.pool)

    def target(self, pool: PoolView) -> int:
        current = pool.num_provisioned
        forecast = self.forecast_rps(pool)
        per_instance = self.per_instance_rps(pool)
        if per_instance is None:  # nothing completed yet: nothing to size by
            return current if current or not pool.queued else 1
        needed_rps = max(forecast, pool.arrivals_per_s) + pool.queued / self.horizon_s
        desired = math.ceil(needed_rps / (per_instance * self.target_utilization))
        stabilize = self._stabilized.setdefault(pool.pool, StabilizedTarget(self.scale_in_window_s))
        return stabilize(desired, current, pool.time_s)
