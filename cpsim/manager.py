"""The seed API: ``ControlPlaneManager`` drives the sans-I/O core from asyncio over a Backend.

This is the one module of ``cpsim`` that imports ``policies`` (to turn names into objects
through the registries it exports) and ``backends`` (to pick the default backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pandas as pd

from cpsim.backend import Backend, ControlPlaneEvents
from cpsim.core import ControlPlane, ControlPlaneConfig, Dispatch
from cpsim.protocols import AdmissionPolicy, PDPolicy, Router, SchedulingPolicy
from cpsim.requests import RequestState
from cpsim.types import (
    ExecutionInstance,
    PDSeparationConfig,
    PerformanceMetrics,
    RequestMetadata,
    RequestStatus,
)
from cpsim.validation import check_positive, lookup
from cpsim.views import InstanceView, RequestView
from policies import PD_POLICIES, ROUTERS, SCHEDULING_POLICIES

log = logging.getLogger("cpsim.manager")

#: How many finished requests keep their status for ``get_request_status``.
FINISHED_HISTORY = 100_000


def make_scheduling_policy(name: str, **kwargs: Any) -> SchedulingPolicy:
    policy: SchedulingPolicy = lookup(SCHEDULING_POLICIES, name, "scheduling_policy")(**kwargs)
    return policy


def make_router(name: str, **kwargs: Any) -> Router:
    router: Router = lookup(ROUTERS, name, "routing_strategy")(**kwargs)
    return router


def make_pd_policy(config: PDSeparationConfig) -> PDPolicy:
    cls: Any = lookup(PD_POLICIES, config.routing_policy, "pd routing_policy")
    policy: PDPolicy = cls.from_config(config)
    return policy


class RouterSwitch:
    """The control plane's router, switchable at run time as in the seed:
    ``cp.router.routing_strategy = "locality"``."""

    def __init__(self, routing_strategy: str) -> None:
        self._router = make_router(routing_strategy)
        self._strategy = routing_strategy

    @property
    def routing_strategy(self) -> str:
        return self._strategy

    @routing_strategy.setter
    def routing_strategy(self, name: str) -> None:
        self._router = make_router(name)
        self._strategy = name

    def use(self, router: Router, routing_strategy: str) -> None:
        """Route with ``router``, built elsewhere (from a Hydra config, with its knobs),
        reported under the registry name ``routing_strategy``."""
        lookup(ROUTERS, routing_strategy, "routing_strategy")
        self._router = router
        self._strategy = routing_strategy

    @property
    def name(self) -> str:
        return self._strategy

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        return self._router.route(request, candidates, now)


class LoadBalancer:
    """The seed's ``cp.load_balancer.select_instance(instances, algorithm=...)``: one routing
    decision over given instances, outside the request flow. Routers keep their state
    (round-robin position, affinity) per algorithm between calls."""

    def __init__(self, core: ControlPlane, clock: Any) -> None:
        self._core = core
        self._clock = clock
        self._routers: dict[str, Router] = {}

    def select_instance(
        self,
        instances: Sequence[ExecutionInstance],
        algorithm: str = "load_balanced",
        request: RequestMetadata | None = None,
    ) -> ExecutionInstance | None:
        router = self._routers.get(algorithm)
        if router is None:
            router = self._routers[algorithm] = make_router(algorithm)
        views = [self._view(i) for i in instances]
        candidates = [v for v in views if v.has_capacity]
        meta = request or RequestMetadata(request_id="select-instance")
        choice = router.route(RequestView.of(meta, self._clock(), 0), candidates, self._clock())
        if choice is None:
            return None
        return next(i for i in instances if i.instance_id == choice.instance_id)

    def _view(self, instance: ExecutionInstance) -> InstanceView:
        try:
            return self._core.instance_state(instance.instance_id).view()
        except ValueError:
            from cpsim.instances import InstanceState

            return InstanceState(instance, self._clock()).view()


class ControlPlaneManager:
    """Queues requests, schedules and routes them over registered instances, and reports.

    Runs in wall time on the current asyncio loop. ``backend`` executes dispatches: the
    default simulates vLLM replicas in wall time so the API works with no engine.
    ``quotas``: per-user and per-tenant limits (``policies.quotas.Quotas``); None: none.
    """

    def __init__(
        self,
        scheduling_policy: str = "fifo",
        routing_strategy: str = "load_balanced",
        enable_monitoring: bool = True,
        enable_pd_separation: bool = False,
        pd_config: PDSeparationConfig | None = None,
        backend: Backend | None = None,
        config: ControlPlaneConfig | None = None,
        monitoring_interval_s: float = 10.0,
        quotas: AdmissionPolicy | None = None,
    ) -> None:
        check_positive("monitoring_interval_s", monitoring_interval_s)
        if enable_pd_separation and pd_config is None:
            pd_config = PDSeparationConfig(enabled=True)
        if pd_config is not None and pd_config.enabled and not enable_pd_separation:
            enable_pd_separation = True
        self.pd_config = pd_config or PDSeparationConfig(enabled=False)
        self.enable_pd_separation = enable_pd_separation
        self.enable_monitoring = enable_monitoring
        self.monitoring_interval_s = monitoring_interval_s
        self.router = RouterSwitch(routing_strategy)
        pd_policy = make_pd_policy(self.pd_config) if enable_pd_separation else None
        self.core = ControlPlane(
            make_scheduling_policy(scheduling_policy),
            self.router,
            pd_policy,
            config,
            quotas=quotas,
        )
        self.core.terminal_listeners.append(self._on_terminal)
        self.events = ControlPlaneEvents(self.core, lambda _now: self._pump())  # its own clock
        self.backend = backend if backend is not None else self._default_backend()
        self.load_balancer = LoadBalancer(self.core, self._now)
        self._t0 = time.monotonic()
        self._time_scale = float(getattr(self.backend, "time_scale", 1.0))
        self._running = False
        self._pumping = False
        self._pump_again = False
        self._finished: OrderedDict[str, tuple[RequestStatus, str]] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[RequestStatus]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # the backend's add/remove of each instance, run in order per instance
        self._backend_ops: dict[str, asyncio.Task[None]] = {}
        self._attached: set[str] = set()  # instances the backend has added
        self.metrics_history: list[PerformanceMetrics] = []

    @staticmethod
    def _default_backend() -> Backend:
        """Simulated vLLM replicas in wall time, so the API works with no engine at all."""
        from backends.sim.live import SimBackend

        return SimBackend()

    def _now(self) -> float:
        """Seconds since construction on the backend's time base: wall seconds, or simulated
        seconds for a backend with a ``time_scale`` (so metrics are in engine time)."""
        return (time.monotonic() - self._t0) * self._time_scale

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the backend and tell it of the instances registered so far; returns once
        each has attached (its engine started, its first health check answered)."""
        if self._running:
            return
        self._running = True
        await self.backend.start(self.events, self._now)
        self._tasks.append(asyncio.create_task(self._tick_loop()))
        if self.enable_monitoring:
            self._tasks.append(asyncio.create_task(self._monitor_loop()))
        for instance in self.core.instances():
            self._attach_in_background(instance)
        await self.wait_for_instances()

    async def stop(self) -> None:
        """Stop: requests still queued or running end CANCELLED, engines are told to abort,
        and the backend lets go of every instance (they stay registered, down, until the
        next ``start``)."""
        if not self._running:
            return
        self._running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        now = self._now()
        for rid in list(self.core.active_ids()):
            abort = self.core.cancel(rid, now)
            if abort is not None:
                self.backend.abort(abort)
        for task in list(self._backend_ops.values()):
            task.cancel()
        await asyncio.gather(*self._backend_ops.values(), return_exceptions=True)
        await asyncio.gather(
            *(self.backend.remove_instance(iid) for iid in sorted(self._attached)),
            return_exceptions=True,
        )
        self._attached.clear()
        for instance in self.core.instances():
            self.core.set_instance_health(instance.instance_id, False)
        await self.backend.stop()

    async def __aenter__(self) -> ControlPlaneManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ instances
    def register_instance(self, instance: ExecutionInstance) -> bool:
        """Register an instance; it takes requests once its backend has attached it. Before
        ``start`` the backend is told when the manager starts; while running, attaching (an
        engine starting, an HTTP server's first health check) runs in the background and
        this returns at once. Until attached the instance is listed, not healthy."""
        self.core.add_instance(instance, self._now())
        self.core.set_instance_health(instance.instance_id, False)
        if self._running:
            self._attach_in_background(instance)
        return True

    def unregister_instance(self, instance_id: str) -> bool:
        """Unregister an instance. Requests on it are requeued or failed as the core's
        ``on_instance_failure`` setting says; the backend lets go of it in the background."""
        self.core.remove_instance(instance_id, self._now())
        if self._running:
            self._backend_op(instance_id, lambda: self._detach(instance_id))
        self._pump()
        return True

    async def drain_instance(self, instance_id: str, timeout_s: float | None = None) -> bool:
        """Take the instance out of service without losing a request: nothing new is routed
        to it, what it holds finishes there, then it is unregistered. Past ``timeout_s``
        it is unregistered anyway (what it still held is requeued or failed, as
        ``unregister_instance`` does). True if it emptied in time."""
        self.core.drain_instance(instance_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self.core.num_on_instance(instance_id):
            if deadline is not None and loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        emptied = self.core.num_on_instance(instance_id) == 0
        self.unregister_instance(instance_id)
        return emptied

    def get_instances(self) -> list[ExecutionInstance]:
        return self.core.instances()

    def get_instance_metrics(self, instance_id: str) -> dict[str, Any]:
        """The seed's fields, then how the instance stands with outlier ejection
        (``ejected``, ``ejected_for_s``, ``ejection_reason``, ``on_probation``,
        ``error_rate``, ...; ``cpsim.outliers``)."""
        state = self.core.instance_state(instance_id)
        view = state.view()
        now = self._now()
        return {
            "instance_id": instance_id,
            "active_requests": view.in_flight,
            "num_running": view.num_running,
            "num_waiting": view.num_waiting,
            "kv_cache_usage": view.kv_cache_usage_frac,
            "avg_latency_ms": state.recent_latency_ms or 0.0,  # 0.0 until one finished
            "recent_ttft_ms": view.recent_ttft_ms,
            "recent_tpot_ms": view.recent_tpot_ms,
            "is_healthy": view.is_healthy,
            "current_load": view.load_frac,
            "gpu_utilization": state.busy_frac(now),
            **state.outliers.describe(now),
        }

    async def wait_for_instances(self, timeout_s: float | None = None) -> None:
        """Wait until the backend has attached or let go of every instance asked so far."""
        pending = list(self._backend_ops.values())
        if pending:
            await asyncio.wait_for(
                asyncio.gather(*pending, return_exceptions=True), timeout_s
            )

    def _attach_in_background(self, instance: ExecutionInstance) -> None:
        self._backend_op(instance.instance_id, lambda: self._attach(instance))

    def _backend_op(self, instance_id: str, op: Callable[[], Awaitable[None]]) -> None:
        """Run ``op()`` as a task after the one still running for the same instance, so
        that a quick unregister and register again reach the backend in order."""
        previous = self._backend_ops.get(instance_id)

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await op()

        task = asyncio.get_running_loop().create_task(run())
        self._backend_ops[instance_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._backend_ops.get(instance_id) is done:
                del self._backend_ops[instance_id]

        task.add_done_callback(forget)

    def _registered(self, instance: ExecutionInstance) -> bool:
        try:
            return self.core.instance_state(instance.instance_id).instance is instance
        except ValueError:
            return False

    async def _attach(self, instance: ExecutionInstance) -> None:
        iid = instance.instance_id
        if not self._registered(instance) or iid in self._attached:
            return  # unregistered before its turn, or attached already
        try:
            ready = await self.backend.add_instance(instance)
        except Exception:  # the instance stays down; nothing is routed to it
            log.exception("backend failed to add instance %s; it stays unhealthy", iid)
            return
        self._attached.add(iid)
        # a backend whose add_instance returns nothing (None) has the instance ready
        if ready is not False and self._registered(instance):
            self.core.set_instance_health(iid, True)
            self._pump()

    async def _detach(self, instance_id: str) -> None:
        if instance_id in self._attached:
            self._attached.discard(instance_id)
            await self.backend.remove_instance(instance_id)

    # ------------------------------------------------------------------ requests
    async def submit_request(self, metadata: RequestMetadata) -> str:
        """Queue a request; returns its id. A full queue rejects it (status REJECTED)."""
        rid = metadata.request_id
        if rid in self._finished:
            raise ValueError(
                f"request_id={rid!r} was already submitted; request ids must be unique"
            )
        self.core.on_arrival(metadata, self._now())
        self._pump()
        return rid

    async def get_request_status(self, request_id: str) -> RequestStatus | None:
        status = self.core.status(request_id)
        if status is not None:
            return status
        done = self._finished.get(request_id)
        return None if done is None else done[0]

    def get_request_reason(self, request_id: str) -> str | None:
        done = self._finished.get(request_id)
        return None if done is None else done[1]

    async def cancel_request(self, request_id: str) -> bool:
        """True if the request was queued or running and is now CANCELLED."""
        if self.core.status(request_id) is None:
            return False
        abort = self.core.cancel(request_id, self._now())
        if abort is not None:
            self.backend.abort(abort)
        self._pump()
        return True

    async def wait_for_request(
        self, request_id: str, timeout_s: float | None = None
    ) -> RequestStatus:
        """Wait until the request is terminal; returns its final status."""
        done = self._finished.get(request_id)
        if done is not None:
            return done[0]
        if self.core.status(request_id) is None:
            raise ValueError(f"request_id={request_id!r} is unknown")
        fut: asyncio.Future[RequestStatus] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(request_id, [])
        waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:  # a wait that timed out (or was cancelled) leaves nothing behind
            if fut in waiters:
                waiters.remove(fut)
                if not waiters and self._waiters.get(request_id) is waiters:
                    del self._waiters[request_id]

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until no request is queued or running."""

        async def _wait() -> None:
            while self.core.num_active:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(_wait(), timeout_s)

    # ------------------------------------------------------------------ reports
    def get_metrics(self) -> PerformanceMetrics:
        now = self._now()
        return self.core.summary(now)

    def get_request_records(self) -> pd.DataFrame:
        return self.core.metrics.records()

    def get_status(self) -> dict[str, Any]:
        """``available_instances`` counts the healthy instances not ejected from routing
        nor draining;
        ``ejected_instances`` says, for each ejected one, for how long and why;
        ``draining_instances`` lists those finishing their requests before they leave;
        ``cut_kv_paths``: the PD KV paths the link policy has cut, and when each is probed."""
        views = self.core.instance_views()
        now = self._now()
        ejected = {}
        for view in views:
            health = self.core.instance_state(view.instance_id).outliers.describe(now)
            if health["ejected"]:
                ejected[view.instance_id] = {
                    "ejected_for_s": health["ejected_for_s"],
                    "reason": health["ejection_reason"],
                }
        return {
            "running": self._running,
            "scheduling_policy": self.core.policy.name,
            "routing_strategy": self.router.routing_strategy,
            "pd_separation": self.enable_pd_separation,
            "backend": self.backend.name,
            "pending_requests": self.core.num_queued,
            "running_requests": self.core.num_running,
            "available_instances": sum(
                1
                for v in views
                if v.is_healthy
                and v.instance_id not in ejected
                and not self.core.is_draining(v.instance_id)
            ),
            "total_instances": len(views),
            "ejected_instances": ejected,
            "draining_instances": [
                v.instance_id for v in views if self.core.is_draining(v.instance_id)
            ],
            "cut_kv_paths": [
                {"prefill": source, "decode": target, "probe_in_s": wait_s}
                for source, target, wait_s in (
                    self.core.links.cut_paths(now) if self.core.links is not None else []
                )
            ],
        }

    def update_policy(self, scheduling_policy: str) -> None:
        self.core.policy = make_scheduling_policy(scheduling_policy)
        self._pump()

    # ------------------------------------------------------------------ internals
    def _pump(self) -> None:
        """Dispatch what can go now. Re-entrant calls (a backend reporting an event from
        inside ``dispatch``) fold into one more pass instead of recursing."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._pump_again = False
                for d in self.core.dispatch(self._now()):
                    self._send(d)
                for abort in self.core.take_aborts():
                    self.backend.abort(abort)
                again = self._pump_again
        finally:
            self._pumping = False

    def _send(self, dispatch: Dispatch) -> None:
        try:
            self.backend.dispatch(dispatch)
        except Exception as exc:  # a backend error must not lose the request
            log.exception("backend failed to dispatch %s", dispatch.request_id)
            self.core.on_failure(
                dispatch.request_id,
                self._now(),
                f"dispatch error: {exc}",
                True,
                dispatch.instance_id,
            )

    def _on_terminal(self, req: RequestState) -> None:
        rid = req.request_id
        self._finished[rid] = (req.status, req.reason)
        if len(self._finished) > FINISHED_HISTORY:
            self._finished.popitem(last=False)
        for fut in self._waiters.pop(rid, []):
            if not fut.done():
                fut.set_result(req.status)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self._pump()

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.monitoring_interval_s)
            metrics = self.get_metrics()
            self.metrics_history.append(metrics)
            log.info(
                "completed=%d queued=%d p99_latency_ms=%.1f slo_compliance=%.3f",
                metrics.completed_requests,
                metrics.queued_requests,
                metrics.p99_latency_ms,
                metrics.slo_compliance_rate,
            )
