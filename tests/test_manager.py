"""The seed API over the scripted backend: lifecycle, status, cancel, failover, switches."""

from __future__ import annotations

import asyncio
import importlib

import pandas as pd
import pytest

from backends.scripted import ScriptedBackend, Timetable
from cpsim import (
    ControlPlaneConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    RequestMetadata,
    RequestStatus,
)
from cpsim.manager import ControlPlaneManager


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def manager(**kw) -> ControlPlaneManager:  # type: ignore[no-untyped-def]
    kw.setdefault("backend", ScriptedBackend(Timetable(ttft_s=0.01, tpot_s=0.001)))
    kw.setdefault("routing_strategy", "round_robin")
    return ControlPlaneManager(**kw)


def test_lifecycle_and_reports() -> None:
    async def main() -> None:
        cp = manager()
        cp.register_instance(ExecutionInstance("a", max_concurrent_requests=2))
        cp.register_instance(ExecutionInstance("b", max_concurrent_requests=2))
        await cp.start()  # the backend is told of them now
        ids = [
            await cp.submit_request(
                RequestMetadata(f"r{i}", num_prompt_tokens=10, max_tokens=5, slo_deadline_ms=5000)
            )
            for i in range(6)
        ]
        status = cp.get_status()
        assert status["running"] and status["available_instances"] == 2
        assert status["pending_requests"] + status["running_requests"] == 6
        for rid in ids:
            assert await cp.wait_for_request(rid, timeout_s=5) is RequestStatus.COMPLETED
        m = cp.get_metrics()
        assert m.completed_requests == 6 and m.slo_compliance_rate == 1.0
        assert m.p99_latency_ms > 0 and m.throughput_tokens_per_s > 0
        inst = cp.get_instance_metrics("a")
        assert {"active_requests", "avg_latency_ms", "is_healthy", "current_load"} <= inst.keys()
        df = cp.get_request_records()
        assert len(df) == 6 and set(df["instance_id"]) == {"a", "b"}
        await cp.stop()
        assert cp.get_status()["running"] is False

    run(main())


def test_cancel_running_aborts_in_backend() -> None:
    async def main() -> None:
        backend = ScriptedBackend(Timetable(ttft_s=0.5))
        cp = manager(backend=backend)
        cp.register_instance(ExecutionInstance("a"))
        await cp.start()  # the backend is told of them now
        rid = await cp.submit_request(RequestMetadata("slow", max_tokens=10))
        assert await cp.get_request_status(rid) is RequestStatus.RUNNING
        assert await cp.cancel_request(rid)
        assert await cp.get_request_status(rid) is RequestStatus.CANCELLED
        assert [a.request_id for a in backend.aborted] == ["slow"]
        assert not await cp.cancel_request(rid)
        await cp.stop()

    run(main())


def test_failed_instance_requeues_elsewhere_and_is_unhealthy() -> None:
    async def main() -> None:
        backend = ScriptedBackend(Timetable(ttft_s=0.2))
        cp = manager(backend=backend)
        cp.register_instance(ExecutionInstance("a"))
        cp.register_instance(ExecutionInstance("b"))
        await cp.start()  # the backend is told of them now
        ids = [await cp.submit_request(RequestMetadata(f"r{i}")) for i in range(4)]
        backend.fail_instance("a")
        for rid in ids:
            assert await cp.wait_for_request(rid, timeout_s=5) is RequestStatus.COMPLETED
        df = cp.get_request_records()
        assert set(df["instance_id"]) == {"b"}
        assert cp.get_instance_metrics("a")["is_healthy"] is False
        await cp.stop()

    run(main())


def test_stop_cancels_everything_left() -> None:
    async def main() -> None:
        cp = manager(backend=ScriptedBackend(Timetable(ttft_s=10.0)))
        cp.register_instance(ExecutionInstance("a", max_concurrent_requests=1))
        await cp.start()  # the backend is told of them now
        for i in range(3):
            await cp.submit_request(RequestMetadata(f"r{i}"))
        await cp.stop()
        df = cp.get_request_records()
        assert sorted(df["status"]) == ["CANCELLED"] * 3
        assert await cp.get_request_status("r2") is RequestStatus.CANCELLED

    run(main())


def test_queue_overflow_is_rejected() -> None:
    async def main() -> None:
        cp = manager(config=ControlPlaneConfig(max_queue_len=1))
        await cp.start()
        await cp.submit_request(RequestMetadata("r0"))
        await cp.submit_request(RequestMetadata("r1"))
        assert await cp.get_request_status("r1") is RequestStatus.REJECTED
        assert "max_queue_len=1" in (cp.get_request_reason("r1") or "")
        with pytest.raises(ValueError, match="already"):
            await cp.submit_request(RequestMetadata("r1"))
        await cp.stop()

    run(main())


def test_switches_at_run_time() -> None:
    async def main() -> None:
        cp = manager()
        await cp.start()
        cp.router.routing_strategy = "random"
        assert cp.get_status()["routing_strategy"] == "random"
        with pytest.raises(ValueError, match="unknown routing_strategy 'nope'"):
            cp.router.routing_strategy = "nope"
        with pytest.raises(ValueError, match="unknown scheduling_policy 'nope'"):
            cp.update_policy("nope")
        a, b = ExecutionInstance("a"), ExecutionInstance("b")
        picked = cp.load_balancer.select_instance([a, b], algorithm="round_robin")
        assert picked in (a, b)
        await cp.stop()

    run(main())


def test_unknown_names_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown scheduling_policy 'magic'; allowed: "):
        ControlPlaneManager(scheduling_policy="magic")
    with pytest.raises(ValueError, match="unknown routing_strategy 'magic'"):
        ControlPlaneManager(routing_strategy="magic")


def test_pd_separation_over_scripted_backend() -> None:
    async def main() -> None:
        cp = manager(
            enable_pd_separation=True,
            pd_config=PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=800),
        )
        cp.register_instance(
            ExecutionInstance("p", instance_type=ExecutionInstanceType.PREFILLING)
        )
        cp.register_instance(
            ExecutionInstance("d", instance_type=ExecutionInstanceType.DECODING)
        )
        await cp.start()  # the backend is told of them now
        await cp.submit_request(RequestMetadata("long", num_prompt_tokens=2000, max_tokens=4))
        await cp.submit_request(RequestMetadata("short", num_prompt_tokens=100, max_tokens=4))
        await cp.drain(timeout_s=5)
        df = cp.get_request_records().set_index("request_id")
        long, short = df.loc["long"], df.loc["short"]
        assert (long["prefill_instance_id"], long["decode_instance_id"]) == ("p", "d")
        assert short["instance_id"] == "d" and pd.isna(short["prefill_instance_id"])
        await cp.stop()

    run(main())


def _pd_manager(backend: ScriptedBackend, decode_slots: int = 64) -> ControlPlaneManager:
    cp = manager(
        backend=backend,
        enable_pd_separation=True,
        pd_config=PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=800),
        config=ControlPlaneConfig(queue_timeout_s=2.0),
    )
    cp.register_instance(ExecutionInstance("p", instance_type=ExecutionInstanceType.PREFILLING))
    cp.register_instance(ExecutionInstance(
        "d", instance_type=ExecutionInstanceType.DECODING, max_concurrent_requests=decode_slots
    ))
    return cp


def test_handoffs_whose_only_decode_instance_died_decode_where_they_were_prefilled() -> None:
    """Five long prompts prefilling when the only decode instance fails: they used to stay
    RUNNING (15 s and more, queue_timeout_s=2), then to fail at the queue timeout, while the
    prefill instance held their KV and could decode them."""

    async def main() -> None:
        backend = ScriptedBackend(Timetable(ttft_s=0.2, tpot_s=0.001))
        cp = _pd_manager(backend)
        await cp.start()
        ids = [f"r{i}" for i in range(5)]
        for rid in ids:
            await cp.submit_request(RequestMetadata(rid, num_prompt_tokens=2000, max_tokens=4))
        backend.fail_instance("d")
        statuses = [await cp.wait_for_request(rid, timeout_s=4.0) for rid in ids]
        records = cp.get_request_records()
        active = cp.get_instance_metrics("p")["active_requests"]
        await cp.stop()
        assert statuses == [RequestStatus.COMPLETED] * 5
        assert set(records["prefill_instance_id"]) == set(records["decode_instance_id"]) == {"p"}
        assert active == 0 and backend.aborted == []

    run(main())


def test_handoffs_no_decode_instance_takes_end_at_the_queue_timeout() -> None:
    """The decode instance is up but full for longer than queue_timeout_s: the prefilled
    requests fail with a reason and the prefill instance is told to let go of their KV."""

    async def main() -> None:
        backend = ScriptedBackend(Timetable(ttft_s=0.2, tpot_s=0.001))
        cp = _pd_manager(backend, decode_slots=1)
        await cp.start()
        await cp.submit_request(RequestMetadata("hog", num_prompt_tokens=10, max_tokens=100_000))
        ids = [f"r{i}" for i in range(5)]
        for rid in ids:
            await cp.submit_request(RequestMetadata(rid, num_prompt_tokens=2000, max_tokens=4))
        statuses = [await cp.wait_for_request(rid, timeout_s=4.0) for rid in ids]
        active = cp.get_instance_metrics("p")["active_requests"]
        reasons = {cp.get_request_reason(rid) for rid in ids}
        await cp.stop()
        assert statuses == [RequestStatus.FAILED] * 5
        assert reasons == {"prefilled on p, but no decode instance took it within 2.0 s"}
        assert active == 0
        aborted = {(a.request_id, a.instance_id) for a in backend.aborted}
        assert {(r, "p") for r in ids} <= aborted

    run(main())


class GatedBackend(ScriptedBackend):
    """A scripted backend whose instances attach only when the test opens ``gate``, ready or
    not as ``ready`` says, and which logs the adds and removes it is asked for."""

    def __init__(self, ready: bool = True, fail: bool = False) -> None:
        super().__init__(Timetable(ttft_s=0.01, tpot_s=0.001))
        self.gate = asyncio.Event()
        self.ready, self.fail = ready, fail
        self.log: list[tuple[str, str]] = []

    async def add_instance(self, instance: ExecutionInstance) -> bool:
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("engine did not start")
        await super().add_instance(instance)
        self.log.append(("add", instance.instance_id))
        return self.ready

    async def remove_instance(self, instance_id: str) -> None:
        await super().remove_instance(instance_id)
        self.log.append(("remove", instance_id))

    def recover(self, instance_id: str) -> None:
        assert self._events is not None
        self._events.on_instance_recovered(instance_id, self._clock())


def test_register_before_start_needs_no_event_loop() -> None:
    cp = manager()
    assert cp.register_instance(ExecutionInstance("a")) is True  # no loop is running here
    assert [i.instance_id for i in cp.get_instances()] == ["a"]
    status = cp.get_status()
    assert (status["available_instances"], status["total_instances"]) == (0, 1)
    cp.update_policy("priority")
    assert cp.get_metrics().total_requests == 0

    async def main() -> None:
        await cp.start()  # attaches "a" before it returns
        assert cp.get_status()["available_instances"] == 1
        assert cp.get_instances()[0].is_healthy
        await cp.submit_request(RequestMetadata("r0", max_tokens=3))
        assert await cp.wait_for_request("r0", timeout_s=5) is RequestStatus.COMPLETED
        await cp.stop()

    run(main())
    assert not cp.get_instances()[0].is_healthy  # stopped: registered, not served


def test_register_while_running_attaches_in_the_background() -> None:
    async def main() -> None:
        backend = GatedBackend()
        cp = manager(backend=backend)
        await cp.start()
        cp.register_instance(ExecutionInstance("a"))  # returns at once: the gate is shut
        await cp.submit_request(RequestMetadata("r0", max_tokens=3))
        await asyncio.sleep(0.1)  # the loop runs on meanwhile (tick, submit)
        assert await cp.get_request_status("r0") is RequestStatus.QUEUED
        assert not cp.get_instance_metrics("a")["is_healthy"]
        backend.gate.set()
        assert await cp.wait_for_request("r0", timeout_s=5) is RequestStatus.COMPLETED
        await cp.stop()

    run(main())


def test_an_instance_not_ready_is_routed_to_once_it_recovers() -> None:
    async def main() -> None:
        backend = GatedBackend(ready=False)
        backend.gate.set()
        cp = manager(backend=backend)
        cp.register_instance(ExecutionInstance("a"))
        await cp.start()
        await cp.submit_request(RequestMetadata("r0", max_tokens=3))
        await asyncio.sleep(0.1)
        assert await cp.get_request_status("r0") is RequestStatus.QUEUED
        backend.recover("a")  # its first health check passed
        assert await cp.wait_for_request("r0", timeout_s=5) is RequestStatus.COMPLETED
        await cp.stop()

    run(main())


def test_an_instance_whose_backend_fails_to_add_it_stays_down() -> None:
    async def main() -> None:
        backend = GatedBackend(fail=True)
        backend.gate.set()
        cp = manager(backend=backend)
        cp.register_instance(ExecutionInstance("a"))
        await cp.start()
        assert cp.get_status()["available_instances"] == 0
        await cp.submit_request(RequestMetadata("r0", max_tokens=3))
        await asyncio.sleep(0.1)
        assert await cp.get_request_status("r0") is RequestStatus.QUEUED
        await cp.stop()
        assert await cp.get_request_status("r0") is RequestStatus.CANCELLED

    run(main())


@pytest.mark.parametrize(
    ("action", "expected"), [("requeue", RequestStatus.COMPLETED), ("fail", RequestStatus.FAILED)]
)
def test_unregister_with_work_follows_the_failure_setting(
    action: str, expected: RequestStatus
) -> None:
    async def main() -> None:
        backend = ScriptedBackend(Timetable(ttft_s=0.3))
        cp = manager(backend=backend, config=ControlPlaneConfig(on_instance_failure=action))
        cp.register_instance(ExecutionInstance("a"))
        await cp.start()
        await cp.submit_request(RequestMetadata("r0", max_tokens=3))
        assert cp.get_instance_metrics("a")["active_requests"] == 1
        cp.register_instance(ExecutionInstance("b"))
        await cp.wait_for_instances()
        assert cp.unregister_instance("a") is True
        assert await cp.wait_for_request("r0", timeout_s=5) is expected
        records = cp.get_request_records()
        assert len(records) == 1  # one terminal state, nothing lost
        if expected is RequestStatus.COMPLETED:
            assert records["instance_id"].iloc[0] == "b"
        with pytest.raises(ValueError, match="instance_id='a' is not registered"):
            cp.get_instance_metrics("a")
        await cp.stop()

    run(main())


def test_unregister_and_register_again_reach_the_backend_in_order() -> None:
    async def main() -> None:
        backend = GatedBackend()
        backend.gate.set()
        cp = manager(backend=backend)
        cp.register_instance(ExecutionInstance("a"))
        await cp.start()
        cp.unregister_instance("a")
        cp.register_instance(ExecutionInstance("a"))
        await cp.wait_for_instances()
        assert backend.log == [("add", "a"), ("remove", "a"), ("add", "a")]
        assert cp.get_instance_metrics("a")["is_healthy"]
        await cp.stop()
        assert backend.log[-1] == ("remove", "a")

    run(main())


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("backends.sim.live", "SimBackend"),
        ("backends.vllm.http", "HTTPBackend"),
        ("backends.vllm.async_engine", "AsyncLLMBackend"),
    ],
)
def test_a_backend_told_of_an_instance_before_start_says_how_to_register_it(
    module: str, name: str
) -> None:
    """Through the manager, registering before start works (the seed does it); a backend
    driven by hand and told of an instance before its start raises a clear error, not a
    bare AssertionError."""
    backend = getattr(importlib.import_module(module), name)()
    with pytest.raises(RuntimeError, match=rf"{name}.add_instance\('a'\) was called before"):
        asyncio.run(backend.add_instance(ExecutionInstance("a")))


def test_drain_instance_finishes_what_it_holds_and_routes_nothing_new_to_it() -> None:
    async def main() -> None:
        cp = manager(backend=ScriptedBackend(Timetable(ttft_s=0.05, tpot_s=0.01)))
        cp.register_instance(ExecutionInstance("a", max_concurrent_requests=4))
        cp.register_instance(ExecutionInstance("b", max_concurrent_requests=4))
        await cp.start()
        held = [await cp.submit_request(RequestMetadata(f"r{i}", max_tokens=20)) for i in range(4)]
        drain = asyncio.create_task(cp.drain_instance("a", timeout_s=5))
        await asyncio.sleep(0.01)
        assert cp.get_status()["draining_instances"] == ["a"]
        later = [await cp.submit_request(RequestMetadata(f"s{i}", max_tokens=2)) for i in range(4)]
        assert await drain is True  # emptied in time, then unregistered
        assert [i.instance_id for i in cp.get_instances()] == ["b"]
        for rid in held + later:
            assert await cp.wait_for_request(rid, timeout_s=5) is RequestStatus.COMPLETED
        df = cp.get_request_records().set_index("request_id")
        assert set(df.loc[later, "instance_id"]) == {"b"}
        assert set(df.loc[held, "instance_id"]) == {"a", "b"}
        with pytest.raises(ValueError, match="not registered"):
            await cp.drain_instance("zz")
        await cp.stop()

    run(main())
