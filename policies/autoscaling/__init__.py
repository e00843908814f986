"""Autoscalers: how many instances each pool should have (cpsim.protocols.Autoscaler).

- ``target_utilization``: demand (in flight + queued) over capacity held near a target, as
  Kubernetes' HPA does, with its scale-in stabilization window;
- ``queue_slo``: out when the queue would outwait a bound or the SLO attainment falls below
  a target, in one at a time after a calm spell (hysteresis) and a cooldown;
- ``predictive``: the arrival rate forecast one cold start ahead (Holt's linear trend) over
  what an instance serves (Little's law on the observed latency).

The driver (backends/sim/autoscale.py in simulation) clamps each target to the pool's
bounds, starts instances with a cold start and drains those it removes.
"""

from __future__ import annotations

from typing import Any

from cpsim.protocols import Autoscaler
from cpsim.validation import lookup
from policies.autoscaling.predictive import PredictiveScaler
from policies.autoscaling.queue_slo import QueueSLOScaler
from policies.autoscaling.utilization import TargetUtilizationScaler

AUTOSCALERS: dict[str, type[Autoscaler]] = {
    "target_utilization": TargetUtilizationScaler,
    "queue_slo": QueueSLOScaler,
    "predictive": PredictiveScaler,
}


def make_autoscaler(name: str, **kwargs: Any) -> Autoscaler:
    """Build the autoscaler registered as ``name``; unknown names raise ValueError."""
    return lookup(AUTOSCALERS, name, "autoscaler")(**kwargs)


__all__ = [
    "AUTOSCALERS",
    "PredictiveScaler",
    "QueueSLOScaler",
    "TargetUtilizationScaler",
    "make_autoscaler",
]
