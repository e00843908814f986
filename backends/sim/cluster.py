"""The SimPy driver: arrivals, replica processes, scrapes and the control plane in virtual time."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pandas as pd
import simpy
from tqdm import tqdm

from backends.sim.autoscale import Pool, PoolScaling
from backends.sim.faults import Fault
from backends.sim.handoff import KVTransfers
from backends.sim.migration import Migrations
from backends.sim.process import ReplicaProcess
from backends.sim.replica import ReplicaConfig, SimReplica, SimRequest
from backends.sim.wakeup import Scheduler
from cpsim.backend import ControlPlaneEvents
from cpsim.core import ControlPlane, Dispatch
from cpsim.latency import StepLatencyModel
from cpsim.models import ModelSpec
from cpsim.protocols import Autoscaler, MigrationPolicy, RestartPolicy
from cpsim.types import ExecutionInstance, PerformanceMetrics, RequestMetadata
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import InstanceSnapshot, Phase


@dataclass(frozen=True)
class ReplicaSpec:
    """One simulated engine: what the control plane registers, how its steps are priced
    (and a line saying by what, for the run's info), the model it holds (for KV bytes), its
    scheduler settings and its faults."""

    instance: ExecutionInstance
    latency: StepLatencyModel
    model: ModelSpec
    num_gpu_blocks: int
    config: ReplicaConfig = field(default_factory=ReplicaConfig)
    faults: tuple[Fault, ...] = ()
    latency_source: str = ""


@dataclass(frozen=True)
class KVLink:
    """The link a PD hand-off moves the KV cache over: bytes x 8 / (Gbit/s) + latency."""

    bandwidth_gbps: float = 100.0
    latency_ms: float = 1.0

    def __post_init__(self) -> None:
        check_positive("bandwidth_gbps", self.bandwidth_gbps)
        check_non_negative("latency_ms", self.latency_ms)

    def transfer_s(self, num_bytes: float) -> float:
        return self.latency_ms / 1000.0 + num_bytes * 8.0 / (self.bandwidth_gbps * 1e9)


@dataclass
class RunResult:
    """What a simulation produced: one row per request (``requests``, read on first use, so
    a run whose records were spilled to disk does not hold them all in memory unless
    asked), per-instance time series sampled at each scrape, the summary, and how long it
    took in virtual and wall seconds. ``scaling``: the autoscaler's series (a row per pool
    per tick; empty without one); ``info["gpu_hours"]``: the GPU-hours paid for (cold
    starts included)."""

    load_requests: Callable[[], pd.DataFrame] = field(repr=False)
    instances: pd.DataFrame
    metrics: PerformanceMetrics
    sim_time_s: float
    wall_time_s: float
    info: dict[str, Any] = field(default_factory=dict)
    scaling: pd.DataFrame = field(default_factory=pd.DataFrame)

    @cached_property
    def requests(self) -> pd.DataFrame:
        return self.load_requests()


class _SeriesRecorder:
    """Per-instance samples at scrape times, by column."""

    COLUMNS = (
        "time_s",
        "instance_id",
        "num_running",
        "num_waiting",
        "in_flight",
        "kv_cache_usage_frac",
        "gpu_utilization_frac",
        "queued_global",
    )

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {c: [] for c in self.COLUMNS}

    def add(self, snap: InstanceSnapshot, in_flight: int, queued: int) -> None:
        c = self.cols
        c["time_s"].append(snap.time_s)
        c["instance_id"].append(snap.instance_id)
        c["num_running"].append(snap.num_running)
        c["num_waiting"].append(snap.num_waiting)
        c["in_flight"].append(in_flight)
        c["kv_cache_usage_frac"].append(snap.kv_cache_usage_frac)
        c["gpu_utilization_frac"].append(snap.gpu_utilization_frac)
        c["queued_global"].append(queued)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.cols)
        df["instance_id"] = df["instance_id"].astype("category")
        return df


def sim_request_for(d: Dispatch, config: ReplicaConfig, now: float) -> SimRequest:
    """The replica-level request of a dispatch (PREFILL: one token; DECODE: prompt KV
    arrives by transfer); prefix hashes only where the replica caches prefixes."""
    req = SimRequest.from_metadata(d.request, d.phase, config.block_size, arrival_time_s=now)
    if not config.enable_prefix_caching:
        req.block_hashes = ()
    return req


def handoff_s(link: KVLink, d: Dispatch, model: ModelSpec) -> float:
    """How long a DECODE dispatch's KV takes to arrive: nothing moves when the request
    decodes where it was prefilled (no decode instance was up)."""
    if d.source_instance_id == d.instance_id:
        return 0.0
    return link.transfer_s(d.request.prompt_tokens * model.kv_bytes_per_token())


class ClusterSimulation:
    """Runs a workload through a ControlPlane over simulated replicas.

    Engine events reach the control plane at their virtual time and every event that may
    free capacity triggers a dispatch pass; what policies see of the engines is refreshed
    every ``scrape_interval_s`` (the control plane's own in-flight counts stay exact).
    ``autoscaler``: sizes ``pools`` (backends/sim/autoscale.py) while the run goes.
    ``migration``: moves running decodes between replicas by ``migration_mechanism``
    (backends/sim/migration.py). ``restart``: brings back replicas that crashed for good,
    each ``restart_s`` (its engine's start-up: weights, warm-up) after the delay the policy
    asks for."""

    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        control_plane: ControlPlane,
        scrape_interval_s: float = 0.5,
        kv_link: KVLink | None = None,
        record_series: bool = True,
        progress: bool | None = None,
        drain_timeout_s: float = 3600.0,
        merged_wakeups: bool = True,
        autoscaler: Autoscaler | None = None,
        pools: Sequence[Pool] = (),
        migration: MigrationPolicy | None = None,
        migration_mechanism: str = "kv_copy",
        restart: RestartPolicy | None = None,
        restart_s: float = 60.0,
    ) -> None:
        check_positive("scrape_interval_s", scrape_interval_s)
        check_non_negative("restart_s", restart_s)
        check_positive("drain_timeout_s", drain_timeout_s)
        if not replicas:
            raise ValueError("replicas=[] is not allowed; a simulation needs at least one replica")
        if pools and autoscaler is None:
            raise ValueError("pools are given but no autoscaler to size them")
        self.env = simpy.Environment()
        # The wake-ups on a compiled heap beside SimPy's queue (``merged_wakeups=False``: on
        # SimPy's own; slower, the same results): the environment runs through ``clock.run``.
        self.clock = Scheduler(self.env, merged=merged_wakeups)
        self.cp = control_plane
        self.scrape_interval_s = scrape_interval_s
        self.kv_link = kv_link or KVLink()
        self.progress = progress
        self.drain_timeout_s = drain_timeout_s
        self.series = _SeriesRecorder() if record_series else None
        self.specs = {s.instance.instance_id: s for s in replicas}
        self.events = ControlPlaneEvents(control_plane, self._dispatch)
        self.transfers = KVTransfers(self.env)
        self.procs: dict[str, ReplicaProcess] = {}
        self.restart = restart
        self.restart_s = restart_s
        self._crashes: dict[str, list[float]] = {}
        # (time, instance, "crash" | "restart" | "give up") for the run's info
        self.recovery_events: list[tuple[float, str, str]] = []
        for spec in replicas:
            self.add_replica(spec, 0.0)
        self._arrivals_done = False
        self._wake_s: float | None = None  # a wake-up due for what a quota holds
        self._done = self.env.event()
        self.cp.terminal_listeners.append(self._on_terminal)
        self.scaling = PoolScaling(self, autoscaler, pools) if autoscaler is not None else None
        self.migrations = (
            Migrations(self, migration, migration_mechanism) if migration is not None else None
        )

    # ------------------------------------------------------------------ replicas
    def add_replica(self, spec: ReplicaSpec, now: float) -> None:
        """Start a replica of ``spec`` and register its instance (it serves from ``now``)."""
        iid = spec.instance.instance_id
        if iid in self.procs:
            raise ValueError(f"instance_id={iid!r} is already a replica of this simulation")
        replica = SimReplica(iid, spec.config, spec.latency, spec.num_gpu_blocks)
        proc = ReplicaProcess(self.env, replica, self.events, clock=self.clock)
        proc.on_crash = self._on_crash
        for fault in spec.faults:
            proc.add_fault(fault)
        self.specs[iid] = spec
        self.procs[iid] = proc
        # a copy: the control plane updates an instance's live fields (health, load), and
        # the caller's specs must stay reusable for the next run
        fresh = dataclasses.replace(spec.instance, is_healthy=True, current_load=0.0)
        self.cp.add_instance(fresh, now)
        if now > 0.0:
            self._dispatch(now)  # its capacity may take queued requests at once

    def remove_replica(self, instance_id: str, now: float) -> None:
        """Unregister a replica that holds nothing (drained) and stop scraping it."""
        if self.cp.num_on_instance(instance_id):
            raise ValueError(
                f"instance {instance_id!r} still holds {self.cp.num_on_instance(instance_id)} "
                "requests; drain it first"
            )
        self.cp.remove_instance(instance_id, now, reason="scaled in")
        del self.procs[instance_id]

    def _on_crash(self, instance_id: str, now: float, comes_back: bool) -> None:
        """A replica crashed: restart it when the policy says, unless a fault brings it
        back by itself."""
        crashes = self._crashes.setdefault(instance_id, [])
        crashes.append(now)
        self.recovery_events.append((now, instance_id, "crash"))
        if comes_back or self.restart is None:
            return
        delay_s = self.restart.restart_delay(tuple(crashes), now)
        if delay_s is None:
            self.recovery_events.append((now, instance_id, "give up"))
            return
        self.clock.call_later(delay_s + self.restart_s, lambda _e: self._restart(instance_id))

    def _restart(self, instance_id: str) -> None:
        proc = self.procs.get(instance_id)
        if proc is None or proc.is_up:  # scaled in meanwhile, or back already
            return
        self.recovery_events.append((self.clock.now(), instance_id, "restart"))
        if self.restart is not None and self.restart.probation:
            self.cp.start_probation(instance_id)
        proc.recover()

    def recovery_summary(self) -> dict[str, Any]:
        """Crashes, restarts and replicas given up, with the events in time order."""
        kinds = [kind for _t, _iid, kind in self.recovery_events]
        given_up = {iid for _t, iid, kind in self.recovery_events if kind == "give up"}
        return {
            "crashes": kinds.count("crash"),
            "restarts": kinds.count("restart"),
            "given_up": sorted(given_up),
            "events": [
                {"time_s": t, "instance_id": iid, "event": kind}
                for t, iid, kind in self.recovery_events
            ],
        }

    @property
    def done(self) -> bool:
        return bool(self._done.triggered)

    # ------------------------------------------------------------------ running
    def run(
        self, requests: Iterable[tuple[float, RequestMetadata]], total: int | None = None
    ) -> RunResult:
        wall0 = time.perf_counter()
        bar = self._bar(total)
        self.env.process(self._first_arrivals(iter(requests), bar))
        self.env.process(self._scrapes())
        if self.scaling is not None:
            self.env.process(self.scaling.loop())
        if self.migrations is not None:
            self.env.process(self.migrations.loop())
        self.clock.run(self._done)
        if bar is not None:
            bar.close()
        end = self.env.now
        scaling = pd.DataFrame()
        if self.scaling is not None:
            scaling = self.scaling.finish(end)
        metrics = self.cp.summary(end)
        info: dict[str, Any] = {"gpu_hours": self.cp.metrics.gpu_hours(end)}
        if self.migrations is not None:
            info["migrations"] = self.migrations.summary()
        if self.recovery_events:
            info["recovery"] = self.recovery_summary()
        return RunResult(
            load_requests=self.cp.metrics.records,
            instances=self.series.frame() if self.series else pd.DataFrame(),
            metrics=metrics,
            sim_time_s=end,
            wall_time_s=time.perf_counter() - wall0,
            info=info,
            scaling=scaling,
        )

    def _bar(self, total: int | None) -> Any:
        show = self.progress if self.progress is not None else (total or 0) >= 50_000
        if not show:
            return None
        return tqdm(total=total, unit="req", desc="simulating", mininterval=1.0, leave=False)

    def _first_arrivals(self, stream: Iterator[tuple[float, RequestMetadata]], bar: Any) -> Any:
        """A process only so that arrivals start when processes do (after those created
        before the run, such as faults at time 0); the rest are timeout callbacks."""
        self._arrivals(stream, bar)
        yield from ()

    def _arrivals(self, stream: Iterator[tuple[float, RequestMetadata]], bar: Any) -> None:
        """Feed ``stream`` in: one timeout callback per arrival time (cheaper than resuming a
        process per arrival); then the drain."""
        env, clock, cp = self.env, self.clock, self.cp
        num_done = 0
        due: RequestMetadata | None = None

        def admit(meta: RequestMetadata) -> None:
            nonlocal num_done
            now = clock.now()
            cp.on_arrival(meta, now)
            self._dispatch(now)
            num_done += 1
            if bar is not None and num_done % 1024 == 0:
                bar.update(1024)

        def arrive(_event: Any = None) -> None:
            nonlocal due
            if due is not None:
                meta, due = due, None
                admit(meta)
            for arrival_s, meta in stream:
                now = clock.now()
                if arrival_s > now:
                    due = meta
                    clock.call_later(arrival_s - now, arrive)
                    return
                admit(meta)
            if bar is not None:
                bar.update(num_done % 1024)
            self._arrivals_done = True
            self._check_done()
            env.process(self._drain())

        arrive()

    def _drain(self) -> Any:
        env = self.env
        deadline = env.now + self.drain_timeout_s
        while not self._done.triggered and env.now < deadline:
            yield env.timeout(min(self.scrape_interval_s * 20, deadline - env.now))
        if not self._done.triggered:
            self.cp.fail_all(
                env.now, f"simulation ended {self.drain_timeout_s} s after the last arrival"
            )
            self._done.succeed()

    def _scrapes(self) -> Any:
        env, cp = self.env, self.cp
        while not self._done.triggered:
            now = env.now
            queued = cp.num_queued
            for iid, proc in self.procs.items():
                snap = proc.snapshot(now)
                cp.on_instance_update(snap, now)
                if self.series is not None:
                    self.series.add(snap, len(cp.instance_state(iid).in_flight), queued)
            # what policies see changed: queued requests (and hand-offs) may fit now
            if cp.num_queued or cp.num_handoffs:
                self._dispatch(now)
            yield env.timeout(self.scrape_interval_s)

    def _on_terminal(self, _req: Any) -> None:
        if self._arrivals_done:
            self._check_done()

    def _check_done(self) -> None:
        if self._arrivals_done and self.cp.num_active == 0 and not self._done.triggered:
            self._done.succeed()

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, now: float) -> None:
        for d in self.cp.dispatch(now):
            self._start(d, now)
        for abort in self.cp.take_aborts():  # an expired hand-off: the prefill KV goes
            if not self.procs[abort.instance_id].abort(abort.request_id):
                self.transfers.cancel(abort.request_id)
        due = self.cp.next_wakeup_s()
        if due is not None and due > now and (self._wake_s is None or due < self._wake_s):
            # a quota holds a request until ``due``: dispatch again then, not at the next event
            self._wake_s = due
            self.clock.call_later(due - now, self._on_wake)

    def _on_wake(self, _event: Any) -> None:
        now = self.clock.now()
        if self._wake_s is not None and now >= self._wake_s:
            self._wake_s = None
        self._dispatch(now)

    def link_break(
        self, source: str | None, target: str, now: float, transfer_s: float
    ) -> tuple[float, str] | None:
        """When a hand-off from ``source`` to ``target`` starting now breaks, and why: the
        first "link" fault of either replica that overlaps the transfer (None: it arrives)."""
        if source is None or source == target:
            return None
        found: tuple[float, str] | None = None
        for iid in (source, target):
            for fault in self.specs[iid].faults:
                overlaps = fault.at_s < now + transfer_s and fault.end_s > now
                if fault.kind != "link" or not overlaps:
                    continue
                at = max(now, fault.at_s) + fault.fail_after_s
                if found is None or at < found[0]:
                    why = f"KV transfer {source} -> {target} failed: the link of {iid} is down"
                    found = (at, why)
        return found

    def _start(self, d: Dispatch, now: float) -> None:
        spec = self.specs[d.instance_id]
        req = sim_request_for(d, spec.config, now)
        proc = self.procs[d.instance_id]
        if d.phase is Phase.DECODE:
            delay_s = handoff_s(self.kv_link, d, spec.model)
            broken = self.link_break(d.source_instance_id, d.instance_id, now, delay_s)
            if broken is None:
                self.transfers.start(proc, req, delay_s)
            else:
                fail_s, reason = broken
                rid, target = d.request_id, d.instance_id

                def report() -> None:
                    self.events.on_link_failure(rid, target, reason, self.clock.now())

                self.transfers.fail(rid, fail_s - now, report)
        else:
            proc.submit(req, d.phase)
