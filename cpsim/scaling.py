"""What an autoscaler sees of a pool, built the same way by the simulated and the live driver.

``ScalingObserver`` counts, per model, what happened to requests between two ticks
(arrivals, completions and their latency, SLO outcomes); ``pool_view`` turns those counts and
the control plane's state into the ``PoolView`` an ``Autoscaler`` is shown. Sans-I/O: the
drivers (backends/sim/autoscale.py, backends/live_autoscale.py) own the clock and the
instances.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from cpsim.core import ControlPlane
from cpsim.requests import RequestState
from cpsim.types import RequestStatus
from cpsim.views import PoolView, RequestView


@dataclass
class PoolCounts:
    """What happened to requests since the last tick."""

    arrivals: int = 0
    completed: int = 0
    latency_s: float = 0.0
    slo_checked: int = 0
    slo_met: int = 0

    @staticmethod
    def total(parts: Iterable[PoolCounts]) -> PoolCounts:
        out = PoolCounts()
        for c in parts:
            out.arrivals += c.arrivals
            out.completed += c.completed
            out.latency_s += c.latency_s
            out.slo_checked += c.slo_checked
            out.slo_met += c.slo_met
        return out


class ScalingObserver:
    """Counts per model asked for (None: no model named) between ticks, from the core's
    arrival and terminal listeners (``attach``); ``take`` returns them and starts afresh."""

    def __init__(self) -> None:
        self._counts: dict[str | None, PoolCounts] = {}

    def attach(self, core: ControlPlane) -> None:
        core.arrival_listeners.append(self.on_arrival)
        core.terminal_listeners.append(self.on_terminal)

    def detach(self, core: ControlPlane) -> None:
        if self.on_arrival in core.arrival_listeners:
            core.arrival_listeners.remove(self.on_arrival)
        if self.on_terminal in core.terminal_listeners:
            core.terminal_listeners.remove(self.on_terminal)

    def _count(self, model: str | None) -> PoolCounts:
        found = self._counts.get(model)
        if found is None:
            found = self._counts[model] = PoolCounts()
        return found

    def on_arrival(self, request: RequestView) -> None:
        self._count(request.model_name).arrivals += 1

    def on_terminal(self, req: RequestState) -> None:
        counts = self._count(req.view.model_name)
        if req.status is RequestStatus.COMPLETED and req.finish_s is not None:
            counts.completed += 1
            counts.latency_s += req.finish_s - req.view.arrival_s
        deadline = req.view.deadline_s()
        if deadline is not None and req.status is not RequestStatus.CANCELLED:
            counts.slo_checked += 1
            met = req.status is RequestStatus.COMPLETED and (req.finish_s or math.inf) <= deadline
            counts.slo_met += int(met)

    def take(self) -> dict[str | None, PoolCounts]:
        counts, self._counts = self._counts, {}
        return counts


def drain_candidate(core: ControlPlane, serving: Sequence[str]) -> str:
    """The serving instance to drain when a pool shrinks: the one holding the fewest
    requests, the newest of equals (``serving`` in order of start)."""
    return min(reversed(serving), key=core.num_on_instance)


def queued_by_model(core: ControlPlane) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for r in core.queued_views():
        out[r.model_name] = out.get(r.model_name, 0) + 1
    return out


def pool_view(
    core: ControlPlane,
    *,
    pool: str,
    model: str,
    serving: Sequence[str],
    num_starting: int,
    num_draining: int,
    min_instances: int,
    max_instances: int,
    max_concurrent_per_instance: int,
    counts: dict[str | None, PoolCounts],
    queued: dict[str | None, int],
    now: float,
    interval_s: float,
    adapters: Collection[str] = (),
) -> PoolView:
    """The pool as its autoscaler sees it: its serving instances' load, and the requests for
    its model or its LoRA ``adapters`` (and those that named no model) queued and counted
    since the last tick."""
    served = {None, model, *adapters}
    mine = PoolCounts.total(c for m, c in counts.items() if m in served)
    return PoolView(
        pool=pool,
        time_s=now,
        interval_s=interval_s,
        num_ready=len(serving),
        num_starting=num_starting,
        num_draining=num_draining,
        min_instances=min_instances,
        max_instances=max_instances,
        max_concurrent_per_instance=max_concurrent_per_instance,
        queued=sum(n for m, n in queued.items() if m in served),
        in_flight=sum(core.num_on_instance(iid) for iid in serving),
        arrivals_per_s=mine.arrivals / interval_s,
        completions_per_s=mine.completed / interval_s,
        slo_attainment=mine.slo_met / mine.slo_checked if mine.slo_checked else None,
        mean_latency_s=mine.latency_s / mine.completed if mine.completed else 0.0,
    )
