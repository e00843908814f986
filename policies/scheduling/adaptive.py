"""Adaptive: picks fifo, priority, slo_aware or cost_optimized from load and SLO compliance."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from cpsim.protocols import LatencyModel, Placement, Router, SchedulingPolicy
from cpsim.validation import check_non_negative, check_positive, check_range
from cpsim.views import InstanceView, RequestView
from policies.scheduling.base import BaseSchedulingPolicy
from policies.scheduling.cost_optimized import CostOptimizedPolicy
from policies.scheduling.fifo import FIFOPolicy
from policies.scheduling.priority import PriorityPolicy
from policies.scheduling.slo_aware import SLOAwarePolicy


def cluster_load(queue: Sequence[RequestView], instances: Sequence[InstanceView]) -> float | None:
    """Mean in-flight over capacity of the healthy instances, plus the queue length over
    their total capacity (so 1.0 means full, above 1.0 a backlog); None without any."""
    healthy = [v for v in instances if v.is_healthy]
    if not healthy:
        return None
    mean_load = sum(v.load_frac for v in healthy) / len(healthy)
    return mean_load + len(queue) / sum(v.max_concurrent_requests for v in healthy)


class AdaptivePolicy(BaseSchedulingPolicy):
    """Each ``order`` call re-decides the mode, first match wins:

    - ``slo_aware`` when load >= ``high_load_frac`` or compliance < ``min_compliance_frac``;
      once in it, it stays while load >= high - ``load_gap_frac`` or compliance <
      min + ``compliance_gap_frac``;
    - ``cost_optimized`` when load <= ``low_load_frac`` and compliance >= min + gap; once in
      it, it stays while load < low + ``load_gap_frac`` and compliance >= min;
    - ``priority`` when the queue holds more than one priority and load > low;
    - ``fifo`` otherwise.

    Load is ``cluster_load``; compliance is the fraction of the last ``window_size``
    completions with an SLO that met it (1.0 before any). A switch also waits
    ``min_dwell_s`` after the previous one. ``switches`` lists (time, from, to). The
    sub-policies see every ``observe``; placements are tagged ``adaptive:<mode>``.
    A request's ``cost_budget`` is enforced only in cost_optimized mode."""

    name = "adaptive"

    def __init__(
        self,
        high_load_frac: float = 0.8,
        low_load_frac: float = 0.3,
        load_gap_frac: float = 0.1,
        min_compliance_frac: float = 0.9,
        compliance_gap_frac: float = 0.05,
        window_size: int = 100,
        min_dwell_s: float = 10.0,
        aging_s: float = 30.0,
        latency_model: LatencyModel | None = None,
    ) -> None:
        check_non_negative("low_load_frac", low_load_frac)
        check_positive("high_load_frac", high_load_frac)
        check_non_negative("load_gap_frac", load_gap_frac)
        if low_load_frac + load_gap_frac > high_load_frac - load_gap_frac:
            raise ValueError(
                f"low_load_frac={low_load_frac} + load_gap_frac={load_gap_frac} must be <= "
                f"high_load_frac={high_load_frac} - load_gap_frac so the bands do not overlap"
            )
        check_range("min_compliance_frac", min_compliance_frac, 0.0, 1.0)
        check_range("compliance_gap_frac", compliance_gap_frac, 0.0, 1.0 - min_compliance_frac)
        check_positive("window_size", window_size, integer=True)
        check_non_negative("min_dwell_s", min_dwell_s)
        self.high_load_frac = high_load_frac
        self.low_load_frac = low_load_frac
        self.load_gap_frac = load_gap_frac
        self.min_compliance_frac = min_compliance_frac
        self.compliance_gap_frac = compliance_gap_frac
        self.min_dwell_s = min_dwell_s
        self.policies: dict[str, SchedulingPolicy] = {
            p.name: p
            for p in (
                FIFOPolicy(),
                PriorityPolicy(aging_s),
                SLOAwarePolicy(latency_model),
                CostOptimizedPolicy(latency_model),
            )
        }
        self.mode = FIFOPolicy.name
        self.switches: list[tuple[float, str, str]] = []
        self._last_switch_s = float("-inf")
        self._outcomes: deque[bool] = deque(maxlen=window_size)

    @property
    def current(self) -> SchedulingPolicy:
        return self.policies[self.mode]

    def compliance_frac(self) -> float:
        if not self._outcomes:
            return 1.0
        return sum(self._outcomes) / len(self._outcomes)

    def target_mode(self, load: float, compliance: float, mixed_priorities: bool) -> str:
        """The mode wanted now, given the current one (this is where the hysteresis is)."""
        high, low, gap = self.high_load_frac, self.low_load_frac, self.load_gap_frac
        min_c, c_gap = self.min_compliance_frac, self.compliance_gap_frac
        if self.mode == SLOAwarePolicy.name:
            slo_first = load >= high - gap or compliance < min_c + c_gap
        else:
            slo_first = load >= high or compliance < min_c
        if slo_first:
            return SLOAwarePolicy.name
        if self.mode == CostOptimizedPolicy.name:
            cost_first = load < low + gap and compliance >= min_c
        else:
            cost_first = load <= low and compliance >= min_c + c_gap
        if cost_first:
            return CostOptimizedPolicy.name
        if mixed_priorities and load > low:
            return PriorityPolicy.name
        return FIFOPolicy.name

    def update(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> str:
        """Re-decide the mode from what is seen now; returns the mode in force."""
        load = cluster_load(queue, instances)
        if load is None:
            return self.mode
        mixed = len({r.priority for r in queue}) > 1
        target = self.target_mode(load, self.compliance_frac(), mixed)
        if target != self.mode and now - self._last_switch_s >= self.min_dwell_s:
            self.switches.append((now, self.mode, target))
            self.mode = target
            self._last_switch_s = now
        return self.mode

    def order(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> Sequence[RequestView]:
        self.update(queue, instances, now)
        return self.current.order(queue, instances, now)

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None:
        placement = self.current.place(request, candidates, router, now)
        if placement is None:
            return None
        return placement._replace(policy=f"{self.name}:{self.mode}")

    def observe(self, request: RequestView, slo_met: bool | None, now: float) -> None:
        if slo_met is not None:
            self._outcomes.append(slo_met)
        for policy in self.policies.values():
            policy.observe(request, slo_met, now)
