"""Autoscaling in the simulator: an autoscaler's targets carried out on a ClusterSimulation.

Every ``autoscaler.interval_s`` each pool (a cluster group) is shown to the autoscaler as a
``PoolView``; its target, clamped to the pool's bounds, is met by starting instances (each
paid for from the moment it is asked for, and serving after the pool's ``cold_start_s``:
weights loading, warm-up) or by removing them: first those still starting (called off),
then serving ones, drained (nothing new is routed to them; they are unregistered once what
they hold has ended, so no request is lost). Each tick adds a row per pool to the scaling
series (``RunResult.scaling``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from cpsim.protocols import Autoscaler
from cpsim.requests import RequestState
from cpsim.scaling import ScalingObserver, drain_candidate, pool_view, queued_by_model
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import PoolView

if TYPE_CHECKING:
    from backends.sim.cluster import ClusterSimulation, ReplicaSpec


@dataclass(frozen=True)
class Pool:
    """Instances built from one template (its instance id is replaced by ``{name}-{k}``),
    between ``min_instances`` and ``max_instances``; a new one serves ``cold_start_s`` after
    it is asked for."""

    name: str
    template: ReplicaSpec
    min_instances: int
    max_instances: int
    cold_start_s: float = 60.0

    def __post_init__(self) -> None:
        check_non_negative("min_instances", self.min_instances, integer=True)
        check_positive("max_instances", self.max_instances, integer=True)
        if self.max_instances < self.min_instances:
            raise ValueError(
                f"pool {self.name!r}: max_instances={self.max_instances} is below "
                f"min_instances={self.min_instances}"
            )
        check_non_negative("cold_start_s", self.cold_start_s)


@dataclass
class _PoolState:
    pool: Pool
    ready: list[str]  # serving, in order of start
    starting: dict[str, tuple[ReplicaSpec, float]]  # id -> (spec, asked for at)
    draining: set[str]
    next_index: int


SERIES_COLUMNS = (
    "time_s",
    "pool",
    "target",
    "ready",
    "starting",
    "draining",
    "queued",
    "in_flight",
    "arrivals_per_s",
    "completions_per_s",
    "slo_attainment",
)


class PoolScaling:
    """Carries out ``autoscaler``'s targets for ``pools`` on ``sim`` (see the module)."""

    def __init__(
        self, sim: ClusterSimulation, autoscaler: Autoscaler, pools: Sequence[Pool]
    ) -> None:
        check_positive("interval_s", autoscaler.interval_s)
        self.sim = sim
        self.autoscaler = autoscaler
        self.states: dict[str, _PoolState] = {}
        for pool in pools:
            members = [
                iid
                for iid, spec in sim.specs.items()
                if spec.instance.metadata.get("pool") == pool.name
            ]
            self.states[pool.name] = _PoolState(pool, members, {}, set(), len(members))
        self.series: dict[str, list[Any]] = {c: [] for c in SERIES_COLUMNS}
        self.observer = ScalingObserver()  # what happened since the last tick, per model
        self.observer.attach(sim.cp)
        sim.cp.terminal_listeners.append(self._on_terminal)

    # ------------------------------------------------------------------ driver hooks
    def _on_terminal(self, req: RequestState) -> None:
        if any(s.draining for s in self.states.values()):
            # unregister drained instances after this event, not inside the core's call
            self.sim.clock.call_later(0.0, lambda _e: self._release_drained(self.sim.env.now))

    def loop(self) -> Any:
        """The SimPy process: a tick every interval until the run is done."""
        env, interval = self.sim.env, self.autoscaler.interval_s
        while not self.sim.done:
            yield env.timeout(interval)
            if self.sim.done:
                return
            self.tick(env.now, interval)

    # ------------------------------------------------------------------ one tick
    def tick(self, now: float, interval_s: float) -> None:
        self._release_drained(now)
        queued = queued_by_model(self.sim.cp)
        counts = self.observer.take()
        for state in self.states.values():
            pool = state.pool
            view = pool_view(
                self.sim.cp,
                pool=pool.name,
                model=pool.template.instance.model_name,
                serving=[iid for iid in state.ready if iid not in state.draining],
                num_starting=len(state.starting),
                num_draining=len(state.draining),
                min_instances=pool.min_instances,
                max_instances=pool.max_instances,
                max_concurrent_per_instance=pool.template.instance.max_concurrent_requests,
                counts=counts,
                queued=queued,
                now=now,
                interval_s=interval_s,
                adapters=pool.template.instance.lora_adapters,
            )
            target = min(pool.max_instances, max(pool.min_instances, self.autoscaler.target(view)))
            self._scale(state, target, now)
            self._record(view, target, state)

    def _scale(self, state: _PoolState, target: int, now: float) -> None:
        serving = [iid for iid in state.ready if iid not in state.draining]
        current = len(serving) + len(state.starting)
        for _ in range(target - current):
            self._start(state, now)
        for _ in range(current - target):
            if state.starting:  # the newest cold start is called off first
                iid = next(reversed(state.starting))
                spec, asked_s = state.starting.pop(iid)
                self.sim.cp.metrics.on_cold_start(spec.instance, asked_s, now)
            else:
                self._drain(state, now)

    def _start(self, state: _PoolState, now: float) -> None:
        pool = state.pool
        iid = f"{pool.name}-{state.next_index}"
        state.next_index += 1
        instance = dataclasses.replace(pool.template.instance, instance_id=iid)
        spec = dataclasses.replace(pool.template, instance=instance)
        state.starting[iid] = (spec, now)

        def ready(_event: Any) -> None:
            if iid not in state.starting:  # called off while starting
                return
            _, asked_s = state.starting.pop(iid)
            at = self.sim.env.now
            self.sim.cp.metrics.on_cold_start(spec.instance, asked_s, at)
            self.sim.add_replica(spec, at)
            state.ready.append(iid)

        self.sim.clock.call_later(pool.cold_start_s, ready)

    def _drain(self, state: _PoolState, now: float) -> None:
        """Drain the serving instance holding the fewest requests (the newest of equals)."""
        cp = self.sim.cp
        serving = [iid for iid in state.ready if iid not in state.draining]
        if not serving:
            return
        victim = drain_candidate(cp, serving)
        cp.drain_instance(victim)
        state.draining.add(victim)
        self._release_drained(now)

    def _release_drained(self, now: float) -> None:
        for state in self.states.values():
            for iid in [i for i in state.draining if self.sim.cp.num_on_instance(i) == 0]:
                state.draining.discard(iid)
                state.ready.remove(iid)
                self.sim.remove_replica(iid, now)

    def finish(self, now: float) -> pd.DataFrame:
        """At the end of the run: cold starts still in progress are paid up to ``now``; the
        scaling series as a table."""
        for state in self.states.values():
            for spec, asked_s in state.starting.values():
                self.sim.cp.metrics.on_cold_start(spec.instance, asked_s, now)
            state.starting.clear()
        frame = pd.DataFrame(self.series)
        frame["pool"] = frame["pool"].astype("category")
        return frame

    def _record(self, view: PoolView, target: int, state: _PoolState) -> None:
        row = (
            view.time_s,
            view.pool,
            target,
            len(state.ready) - len(state.draining),
            len(state.starting),
            len(state.draining),
            view.queued,
            view.in_flight,
            view.arrivals_per_s,
            view.completions_per_s,
            view.slo_attainment,
        )
        for column, value in zip(SERIES_COLUMNS, row, strict=True):
            self.series[column].append(value)
