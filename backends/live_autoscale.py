"""Autoscaling live: an autoscaler's targets carried out on a running ControlPlaneManager.

Every ``autoscaler.interval_s`` the pool (instances of one model that a launcher starts) is
shown to the autoscaler as a ``PoolView`` built as in the simulator (cpsim/scaling.py). Out:
the launcher starts an instance (for vLLM, a server process; its cold start is however long
the engine takes to answer its health check) and it is registered once up. In: an instance
is drained (nothing new routed to it, what it holds finishes), unregistered and stopped.
``events`` lists what happened, for tests and logs.

    scaler = LiveAutoscaler(manager, TargetUtilizationScaler(interval_s=2.0), launcher,
                            min_instances=1, max_instances=3)
    await scaler.start()   # adopts the launcher's instances already registered
    ...
    await scaler.stop()    # stops its loop (the instances stay; ``launcher.close()`` ends them)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Protocol

from cpsim.manager import ControlPlaneManager
from cpsim.protocols import Autoscaler
from cpsim.scaling import ScalingObserver, drain_candidate, pool_view, queued_by_model
from cpsim.types import ExecutionInstance
from cpsim.validation import check_non_negative, check_positive

log = logging.getLogger("cpsim.autoscale")


class InstanceLauncher(Protocol):
    """Starts and stops the instances of one pool. ``start(k)`` returns the k-th instance
    once it can serve; ``stop`` ends it (after it was unregistered)."""

    @property
    def template(self) -> ExecutionInstance: ...

    async def start(self, index: int) -> ExecutionInstance: ...

    async def stop(self, instance_id: str) -> None: ...


class SimInstanceLauncher:
    """Instances like ``template`` (ids ``{prefix}-{k}``) for a manager over simulated
    replicas (the default backend), each ready ``cold_start_s`` wall seconds after it is
    asked for."""

    def __init__(self, template: ExecutionInstance, cold_start_s: float = 0.0,
                 prefix: str = "scaled") -> None:  # fmt: skip
        check_non_negative("cold_start_s", cold_start_s)
        self.template = template
        self.cold_start_s = cold_start_s
        self.prefix = prefix

    async def start(self, index: int) -> ExecutionInstance:
        await asyncio.sleep(self.cold_start_s)
        return dataclasses.replace(
            self.template,
            instance_id=f"{self.prefix}-{index}",
            metadata=dict(self.template.metadata),  # its own, not the template's
        )

    async def stop(self, instance_id: str) -> None:
        return None


class LiveAutoscaler:
    """Sizes one pool of ``manager``'s instances between ``min_instances`` and
    ``max_instances`` (see the module)."""

    def __init__(
        self,
        manager: ControlPlaneManager,
        autoscaler: Autoscaler,
        launcher: InstanceLauncher,
        min_instances: int = 1,
        max_instances: int = 4,
        pool: str = "pool",
        drain_timeout_s: float = 600.0,
    ) -> None:
        check_non_negative("min_instances", min_instances, integer=True)
        check_positive("max_instances", max_instances, integer=True)
        if max_instances < min_instances:
            raise ValueError(
                f"max_instances={max_instances} is below min_instances={min_instances}"
            )
        check_positive("interval_s", autoscaler.interval_s)
        self.manager = manager
        self.autoscaler = autoscaler
        self.launcher = launcher
        self.min_instances = min_instances
        self.max_instances = max_instances
        self.pool = pool
        self.drain_timeout_s = drain_timeout_s
        self.serving: list[str] = []
        self.starting: dict[int, asyncio.Task[None]] = {}
        self.draining: dict[str, asyncio.Task[None]] = {}
        self.events: list[tuple[float, str, str]] = []  # (time, "start"/"ready"/..., id)
        self.observer = ScalingObserver()
        # the launcher's slot of each instance serving or draining: a slot is reused once
        # its instance is stopped (a vLLM launcher has one port per slot)
        self._slot_of: dict[str, int] = {}
        self._loop: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, adopt: list[str] | None = None) -> None:
        """Start ticking; ``adopt``: the pool's instances already registered, the
        launcher's slots 0, 1, ... in that order."""
        self.serving = list(adopt or [])
        self._slot_of = {iid: k for k, iid in enumerate(self.serving)}
        self.observer.attach(self.manager.core)
        self._loop = asyncio.create_task(self._run())

    async def stop(self, abandon: bool = False) -> None:
        """Stop ticking and wait for starts and drains in progress; ``abandon``: call them
        off instead (at shutdown: what the instances hold is cancelled anyway, and the
        launcher stops every engine it started)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        pending = [*self.starting.values(), *self.draining.values()]
        if abandon:
            for task in pending:
                task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.observer.detach(self.manager.core)

    async def _run(self) -> None:
        # ticks ``interval_s`` apart on the manager's clock (simulated seconds over a sped-up
        # simulated backend), the rates over the time that really passed between them
        wall_s = self.autoscaler.interval_s / float(getattr(self.manager, "_time_scale", 1.0))
        last = self.manager._now()
        while True:
            await asyncio.sleep(wall_s)
            now = self.manager._now()
            try:
                self.tick(max(now - last, 1e-9))
            except Exception:  # a bad tick must not end autoscaling
                log.exception("autoscaling tick failed")
            last = now

    # ------------------------------------------------------------------ one tick
    def tick(self, interval_s: float) -> int:
        """Show the pool to the autoscaler and start or drain toward its target; returns it."""
        core, now = self.manager.core, self.manager._now()
        template = self.launcher.template
        view = pool_view(
            core,
            pool=self.pool,
            model=template.model_name,
            serving=self.serving,
            num_starting=len(self.starting),
            num_draining=len(self.draining),
            min_instances=self.min_instances,
            max_instances=self.max_instances,
            max_concurrent_per_instance=template.max_concurrent_requests,
            counts=self.observer.take(),
            queued=queued_by_model(core),
            now=now,
            interval_s=interval_s,
            adapters=template.lora_adapters,
        )
        target = min(self.max_instances, max(self.min_instances, self.autoscaler.target(view)))
        current = len(self.serving) + len(self.starting)
        for _ in range(target - current):
            used = set(self.starting) | set(self._slot_of.values())
            index = next(k for k in range(len(used) + 1) if k not in used)
            self.starting[index] = asyncio.create_task(self._start(index))
        for _ in range(current - target):
            if self.starting:  # a start not done yet is the cheapest to call off
                index = max(self.starting)
                self.starting.pop(index).cancel()
                self.events.append((now, "called off", str(index)))
            elif self.serving:
                self._drain(drain_candidate(self.manager.core, self.serving))
        return target

    async def _start(self, index: int) -> None:
        self.events.append((self.manager._now(), "start", str(index)))
        try:
            instance = await self.launcher.start(index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("starting instance %s of pool %s failed", index, self.pool)
            self.events.append((self.manager._now(), "start failed", f"{index}: {exc}"))
            self.starting.pop(index, None)
            return
        self.manager.register_instance(instance)
        await self.manager.wait_for_instances()
        self.serving.append(instance.instance_id)
        self._slot_of[instance.instance_id] = index
        self.starting.pop(index, None)
        self.events.append((self.manager._now(), "ready", instance.instance_id))

    def _drain(self, instance_id: str) -> None:
        self.serving.remove(instance_id)
        self.events.append((self.manager._now(), "drain", instance_id))

        async def drain() -> None:
            await self.manager.drain_instance(instance_id, timeout_s=self.drain_timeout_s)
            await self.manager.wait_for_instances()
            await self.launcher.stop(instance_id)
            self.draining.pop(instance_id, None)
            self._slot_of.pop(instance_id, None)
            self.events.append((self.manager._now(), "stopped", instance_id))

        self.draining[instance_id] = asyncio.create_task(drain())


class PoolAutoscaling:
    """Several pools sized side by side, as one service beside a manager (the gateway's
    ``services``): each ``(scaler, instances)`` pair is a pool's autoscaler and the ids of
    its instances already registered, adopted at ``start``. ``stop`` calls off the starts
    and drains in progress."""

    def __init__(self, pools: list[tuple[LiveAutoscaler, list[str]]]) -> None:
        self.pools = pools

    @property
    def scalers(self) -> list[LiveAutoscaler]:
        return [scaler for scaler, _ in self.pools]

    async def start(self) -> None:
        for scaler, instances in self.pools:
            await scaler.start(adopt=instances)

    async def stop(self) -> None:
        for scaler in self.scalers:
            await scaler.stop(abandon=True)
