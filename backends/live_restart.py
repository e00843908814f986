"""Engine restarts live: a restart policy carried out on a running ControlPlaneManager.

Every ``check_interval_s`` the supervisor looks at each engine it watches; one whose process
has exited is a crash (the manager, by its own health checks, has already stopped routing to
it and requeued or failed what it held). The policy (policies/recovery) says how long to wait
before the restart, or to give up; the engine is then started again on the same address, and
once it answers its health check the manager routes to it again (on probation first, if the
policy asks: one request at a time until a few succeed). A start that hangs (its process up,
its health check never answering within ``health_timeout_s``) is stopped, so that the next
check sees a crash and the policy decides again (a later restart, or giving up), rather than
an engine left half-started with nobody to restart it. ``events`` lists what happened, as
(manager time, "crash" / "restart" / "up" / "restart failed" / "give up", instance id).

    supervisor = EngineSupervisor(manager, BackoffRestart(), {e.instance.instance_id: e
                                                              for e in engines})
    await supervisor.start()
    ...
    await supervisor.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from cpsim.manager import ControlPlaneManager
from cpsim.protocols import RestartPolicy
from cpsim.validation import check_positive

log = logging.getLogger("cpsim.restart")


class RestartableEngine(Protocol):
    """An engine process the supervisor can watch and start again
    (backends.vllm.launcher.LaunchedEngine is one)."""

    def exited(self) -> bool: ...

    def start(self) -> None: ...

    def wait_healthy(self, timeout_s: float) -> None: ...

    def stop(self) -> None: ...


class SimEngine:
    """A replica of a manager over simulated replicas (backends.sim.live.SimBackend), as a
    restartable engine: crashed is exited, a start brings it back empty."""

    def __init__(self, manager: ControlPlaneManager, instance_id: str) -> None:
        self.manager = manager
        self.instance_id = instance_id

    def _proc(self) -> Any:
        return self.manager.backend.replica_process(self.instance_id)  # type: ignore[attr-defined]

    def exited(self) -> bool:
        return not self._proc().is_up

    def start(self) -> None:
        self._proc().recover()

    def wait_healthy(self, timeout_s: float) -> None:
        return None

    def stop(self) -> None:
        self._proc().crash("stopped by the supervisor")


class EngineSupervisor:
    """Restarts the engines of ``engines`` (by instance id) that die, when ``policy`` says
    (see the module). ``health_timeout_s``: how long a restarted engine may take to answer
    its health check before the start counts as failed (and as another crash)."""

    def __init__(
        self,
        manager: ControlPlaneManager,
        policy: RestartPolicy,
        engines: Mapping[str, RestartableEngine],
        check_interval_s: float = 0.5,
        health_timeout_s: float = 240.0,
    ) -> None:
        check_positive("check_interval_s", check_interval_s)
        check_positive("health_timeout_s", health_timeout_s)
        self.manager = manager
        self.policy = policy
        self.engines = dict(engines)
        self.check_interval_s = check_interval_s
        self.health_timeout_s = health_timeout_s
        self.events: list[tuple[float, str, str]] = []
        self.given_up: set[str] = set()
        self.restarting: dict[str, asyncio.Task[None]] = {}
        self._crashes: dict[str, list[float]] = {}
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop watching, and call off the restarts not done yet."""
        tasks = [t for t in (self._loop, *self.restarting.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                self.check()
            except Exception:  # a bad check must not end supervision
                log.exception("engine supervision check failed")

    def check(self) -> None:
        """Look at every engine once: a dead one not being restarted is a crash."""
        for instance_id, engine in self.engines.items():
            if instance_id in self.restarting or instance_id in self.given_up:
                continue
            if engine.exited():
                self._on_crash(instance_id)

    def _on_crash(self, instance_id: str) -> None:
        now = self.manager._now()
        crashes = self._crashes.setdefault(instance_id, [])
        crashes.append(now)
        self.events.append((now, "crash", instance_id))
        delay_s = self.policy.restart_delay(tuple(crashes), now)
        if delay_s is None:
            self.given_up.add(instance_id)
            self.events.append((now, "give up", instance_id))
            log.warning("engine %s crashed %d times; left down", instance_id, len(crashes))
            return
        self.restarting[instance_id] = asyncio.create_task(self._restart(instance_id, delay_s))

    async def _restart(self, instance_id: str, delay_s: float) -> None:
        engine = self.engines[instance_id]
        # the policy's seconds are the manager's (simulated seconds over a sped-up backend)
        await asyncio.sleep(delay_s / float(getattr(self.manager, "_time_scale", 1.0)))
        self.events.append((self.manager._now(), "restart", instance_id))
        try:
            await asyncio.to_thread(engine.start)
            await asyncio.to_thread(engine.wait_healthy, self.health_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # died or hung on the way up: the next check sees a crash
            log.warning("restarting engine %s failed: %s", instance_id, exc)
            self.events.append((self.manager._now(), "restart failed", instance_id))
            if not engine.exited():  # hung: stopped, so that the policy decides again
                await asyncio.to_thread(engine.stop)
        else:
            if self.policy.probation:
                self.manager.core.start_probation(instance_id)
            self.events.append((self.manager._now(), "up", instance_id))
        finally:
            self.restarting.pop(instance_id, None)
