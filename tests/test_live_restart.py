"""Engine restarts live (backends/live_restart.py) over the manager's simulated backend: a
dead engine is restarted after the policy's delay and serves again, on probation first; one
that keeps dying is given up; nothing submitted is lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.live_restart import EngineSupervisor, SimEngine
from backends.sim.live import SimBackend
from cpsim.manager import ControlPlaneManager
from cpsim.types import ExecutionInstance, RequestMetadata
from policies.recovery.restart import BackoffRestart

SCALE = 10.0  # simulated seconds per wall second


async def supervised(policy: BackoffRestart) -> tuple[ControlPlaneManager, EngineSupervisor]:
    cp = ControlPlaneManager(enable_monitoring=False, backend=SimBackend(time_scale=SCALE))
    for iid in ("a", "b"):
        cp.register_instance(ExecutionInstance(iid, max_concurrent_requests=8))
    await cp.start()
    engines = {iid: SimEngine(cp, iid) for iid in ("a", "b")}
    supervisor = EngineSupervisor(cp, policy, engines, check_interval_s=0.02)
    await supervisor.start()
    return cp, supervisor


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_dead_engine_is_restarted_after_the_delay_and_serves_again_on_probation() -> None:
    async def main() -> dict[str, Any]:
        cp, supervisor = await supervised(BackoffRestart(initial_delay_s=2.0))
        for i in range(6):
            await cp.submit_request(RequestMetadata(f"r{i}", num_prompt_tokens=64, max_tokens=400))
        await asyncio.sleep(0.05)
        cp.backend.replica_process("a").crash("killed by the test")
        await until(lambda: any(kind == "up" for _, kind, _ in supervisor.events))
        probation = cp.get_instance_metrics("a")["on_probation"]
        await until(lambda: cp.get_instance_metrics("a")["is_healthy"])
        for i in range(6, 16):
            await cp.submit_request(RequestMetadata(f"r{i}", num_prompt_tokens=64, max_tokens=20))
        await cp.drain(timeout_s=60)
        await supervisor.stop()
        out = {"events": supervisor.events, "probation": probation,
               "records": cp.get_request_records()}  # fmt: skip
        await cp.stop()
        return out

    out = asyncio.run(asyncio.wait_for(main(), 60.0))
    kinds = [(kind, iid) for _, kind, iid in out["events"]]
    assert kinds == [("crash", "a"), ("restart", "a"), ("up", "a")]
    times = {kind: t for t, kind, _ in out["events"]}
    assert times["restart"] - times["crash"] >= 2.0 * 0.9  # the policy's delay, in sim seconds
    assert out["probation"] is True
    records = out["records"]
    assert len(records) == 16 and records.status.isin(["COMPLETED", "FAILED"]).all()
    late = records[records.request_id.isin([f"r{i}" for i in range(6, 16)])]
    assert (late.status == "COMPLETED").all() and (late.instance_id.astype(str) == "a").any()


def test_an_engine_that_keeps_dying_is_given_up() -> None:
    async def main() -> list[tuple[float, str, str]]:
        cp, supervisor = await supervised(BackoffRestart(initial_delay_s=0.5, max_restarts=2))
        proc = cp.backend.replica_process("b")
        for _ in range(3):
            crashes = sum(kind == "crash" for _, kind, _ in supervisor.events)
            await until(lambda: proc.is_up)
            proc.crash("killed by the test")
            await until(lambda c=crashes: sum(k == "crash" for _, k, _ in supervisor.events) > c)
        await until(lambda: "b" in supervisor.given_up)
        await asyncio.sleep(0.2)
        assert not proc.is_up and not cp.get_instance_metrics("b")["is_healthy"]
        await supervisor.stop()
        await cp.stop()
        return supervisor.events

    events = asyncio.run(asyncio.wait_for(main(), 60.0))
    assert [kind for _, kind, _ in events] == [
        "crash", "restart", "up", "crash", "restart", "up", "crash", "give up"
    ]  # fmt: skip


def test_cpsim_serve_restarts_its_engines_with_restart_backoff() -> None:
    pytest.importorskip("fastapi")
    from experiments.serve import build_gateway
    from tests.test_configs import compose_serve

    cfg = compose_serve(["restart=backoff", "restart.initial_delay_s=1.0"])
    gateway, _ = build_gateway(cfg, {})
    (supervisor,) = gateway.services
    assert isinstance(supervisor, EngineSupervisor)
    assert set(supervisor.engines) == {"ondemand-0", "ondemand-1", "spot-0", "spot-1"}

    async def main() -> list[tuple[float, str, str]]:
        await gateway.start()
        gateway.manager.backend.replica_process("spot-1").crash("killed by the test")
        await until(lambda: any(kind == "up" for _, kind, _ in supervisor.events))
        await gateway.stop()
        return supervisor.events

    events = asyncio.run(asyncio.wait_for(main(), 30.0))
    assert [(kind, iid) for _, kind, iid in events] == [
        ("crash", "spot-1"), ("restart", "spot-1"), ("up", "spot-1")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="restart= needs engines cpsim starts"):
        build_gateway(compose_serve(["restart=backoff", "backend=vllm_http",
                                     "cluster=vllm_endpoints"]), {})  # fmt: skip


class HangingOnce:
    """An engine whose first restart hangs (its process up, never healthy) and whose second
    comes up: a stand-in for a launched server stuck loading."""

    def __init__(self) -> None:
        self.alive, self.starts, self.stops = False, 0, 0

    def exited(self) -> bool:
        return not self.alive

    def start(self) -> None:
        self.starts += 1
        self.alive = True

    def wait_healthy(self, timeout_s: float) -> None:
        if self.starts == 1:
            raise TimeoutError(f"no /health 200 within {timeout_s} s")

    def stop(self) -> None:
        self.stops += 1
        self.alive = False


def test_a_restart_that_hangs_is_stopped_and_the_policy_restarts_it_again() -> None:
    async def main() -> tuple[list[tuple[float, str, str]], HangingOnce]:
        cp = ControlPlaneManager(enable_monitoring=False, backend=SimBackend(time_scale=SCALE))
        cp.register_instance(ExecutionInstance("a", max_concurrent_requests=8))
        await cp.start()
        engine = HangingOnce()  # down at the start: a crash to the supervisor
        supervisor = EngineSupervisor(
            cp, BackoffRestart(initial_delay_s=0.1), {"a": engine}, check_interval_s=0.02
        )
        await supervisor.start()
        await until(lambda: any(kind == "up" for _, kind, _ in supervisor.events))
        await supervisor.stop()
        await cp.stop()
        return supervisor.events, engine

    events, engine = asyncio.run(asyncio.wait_for(main(), 30.0))
    kinds = [kind for _, kind, _ in events]
    assert kinds == ["crash", "restart", "restart failed", "crash", "restart", "up"]
    assert engine.starts == 2 and engine.stops == 1 and engine.alive
