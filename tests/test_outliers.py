"""Failure-aware routing in the core: outlier ejection, probation, retries that avoid the
instance that failed them, the retry budget, and the error rate counted as load."""

from __future__ import annotations

import asyncio

import pytest

from backends.scripted import ScriptedBackend
from cpsim import ControlPlane, ControlPlaneConfig, ExecutionInstance, RequestMetadata
from cpsim.manager import ControlPlaneManager
from cpsim.outliers import OutlierConfig
from policies import ROUTERS, SCHEDULING_POLICIES

FAST = OutlierConfig(consecutive_failures=3, base_ejection_s=10.0, max_ejection_s=25.0)


def make_cp(router: str = "round_robin", **config) -> ControlPlane:  # type: ignore[no-untyped-def]
    config.setdefault("outliers", FAST)
    cp = ControlPlane(
        SCHEDULING_POLICIES["fifo"](), ROUTERS[router](), config=ControlPlaneConfig(**config)
    )
    for iid in ("bad", "good"):
        cp.add_instance(ExecutionInstance(iid, max_concurrent_requests=100), 0.0)
    return cp


def req(rid: str) -> RequestMetadata:
    return RequestMetadata(rid, num_prompt_tokens=10, max_tokens=4)


def serve(cp: ControlPlane, now: float, rid: str) -> str:
    """Submit ``rid`` at ``now`` and play it out: "bad" fails it, "good" finishes it (each
    at once, again and again until the request is terminal). Returns where it ended."""
    cp.on_arrival(req(rid), now)
    where = ""
    while cp.status(rid) is not None:
        out = cp.dispatch(now)
        if not out:
            break
        for d in out:
            where = d.instance_id
            if d.instance_id == "bad":
                cp.on_failure(d.request_id, now, "HTTP 500", True, "bad")
            else:
                cp.on_finish(d.request_id, now, 4, d.instance_id)
    return where


def test_consecutive_failures_eject_the_instance_for_a_back_off_that_doubles() -> None:
    cp = make_cp()
    for i in range(6):
        serve(cp, 0.0, f"r{i}")
    health = cp.instance_state("bad").outliers
    assert health.is_ejected() and health.ejected_until_s == 10.0
    assert health.reason == "3 consecutive failures"
    # ejected: everything goes to "good"
    assert {serve(cp, 5.0, f"e{i}") for i in range(5)} == {"good"}
    # back on probation at 10 s: one probe goes to "bad", fails, and it is out for 20 s
    ends = [serve(cp, 10.0, f"p{i}") for i in range(4)]
    assert ends.count("good") == 4  # the probe's request was retried on "good"
    assert health.ejected_until_s == 30.0 and health.reason.startswith("failed a probe")
    for i in range(4):  # round robin reaches the probe within two requests
        serve(cp, 30.0, f"q{i}")
    assert health.ejected_until_s == 30.0 + FAST.max_ejection_s  # capped


def test_probation_takes_a_trickle_and_enough_successes_trust_the_instance_again() -> None:
    cp = make_cp(outliers=OutlierConfig(consecutive_failures=1, base_ejection_s=1.0))
    cp.on_arrival(req("x"), 0.0)
    (d,) = cp.dispatch(0.0)
    cp.on_failure("x", 0.0, "HTTP 500", True, d.instance_id)
    bad = d.instance_id
    assert cp.instance_state(bad).outliers.is_ejected()
    cp.dispatch(0.0)  # x retried on the other one
    for i in range(6):
        cp.on_arrival(req(f"r{i}"), 2.0)
    placed = [d.instance_id for d in cp.dispatch(2.0)]
    assert placed.count(bad) == 1  # one probe at a time; the rest went to the other
    state = cp.instance_state(bad)
    assert state.outliers.probing
    for rid in list(state.in_flight):
        cp.on_finish(rid, 2.1, 4, bad)
    # probe_successes (3) successes make it trusted again, the back-off reset
    served_by_bad = 1
    for i in range(10):
        cp.on_arrival(req(f"s{i}"), 3.0)
        for d in cp.dispatch(3.0):
            served_by_bad += d.instance_id == bad
            cp.on_finish(d.request_id, 3.0, 4, d.instance_id)
    assert served_by_bad >= 3
    assert not state.outliers.probing and state.outliers.ejections_in_a_row == 0


def test_a_failure_rate_over_the_threshold_ejects_without_consecutive_failures() -> None:
    config = OutlierConfig(consecutive_failures=100, failure_rate=0.5, window=10, min_requests=10)
    cp = make_cp(outliers=config)
    state = cp.instance_state("bad")
    reasons = [state.record_outcome(failed, 0.0, config) for failed in [True, True, False] * 4]
    # none before min_requests outcomes; at the tenth, 7 of 10 failed
    assert reasons[:9] == [None] * 9
    assert reasons[9] == "7 of its last 10 requests failed (more than failure_rate=0.5)"


def test_a_retry_avoids_the_instance_that_failed_it_while_another_can_take_it() -> None:
    cp = make_cp(router="load_balanced", outliers=OutlierConfig(enabled=False))
    for i in range(50):
        cp.on_arrival(req(f"r{i}"), 0.0)
    first = {d.request_id: d.instance_id for d in cp.dispatch(0.0)}
    for rid, iid in first.items():
        if iid == "bad":
            cp.on_failure(rid, 0.1, "HTTP 500", True, "bad")
    again = cp.dispatch(0.1)
    assert again and {d.instance_id for d in again} == {"good"}


def test_the_error_rate_counts_as_load_so_a_fast_failing_instance_does_not_look_idle() -> None:
    cp = make_cp(router="load_balanced", outliers=OutlierConfig(enabled=False))
    cp.on_arrival(req("a"), 0.0)
    (d,) = cp.dispatch(0.0)
    assert d.instance_id == "bad"  # both idle: the first one
    cp.on_failure("a", 0.0, "HTTP 500", True, "bad")
    cp.on_arrival(req("b"), 0.0)
    assert cp.instance_state("bad").view().recent_error_rate == 1.0
    # "good" holds a (the retry) and is still the less loaded one
    assert {d.instance_id for d in cp.dispatch(0.0)} == {"good"}


def test_a_request_caused_failure_does_not_count_against_the_instance() -> None:
    cp = make_cp()
    for i in range(10):
        cp.on_arrival(req(f"r{i}"), 0.0)
        for d in cp.dispatch(0.0):
            cp.on_failure(d.request_id, 0.0, "prompt too long", False, d.instance_id, False)
    for iid in ("bad", "good"):
        health = cp.instance_state(iid).outliers
        assert not health.is_ejected() and health.error_rate == 0.0


def test_at_most_max_ejected_frac_is_ejected_and_an_all_ejected_pool_is_still_used() -> None:
    cp = make_cp(outliers=OutlierConfig(consecutive_failures=1, max_ejected_frac=0.5))
    for i in range(4):
        cp.on_arrival(req(f"r{i}"), 0.0)
    for d in cp.dispatch(0.0):
        cp.on_failure(d.request_id, 0.0, "HTTP 500", True, d.instance_id)
    ejected = [i for i in ("bad", "good") if cp.instance_state(i).outliers.is_ejected()]
    assert len(ejected) == 1  # of two, one at most
    cp.remove_instance("good" if ejected == ["bad"] else "bad", 0.0)
    # the one left is ejected, and alone: requests go to it rather than wait for nothing
    cp.on_arrival(req("last"), 0.0)
    assert [d.instance_id for d in cp.dispatch(0.0)][-1] == ejected[0]


def test_the_retry_budget_stops_retries_from_multiplying_an_outage() -> None:
    cp = ControlPlane(
        SCHEDULING_POLICIES["fifo"](),
        ROUTERS["round_robin"](),
        config=ControlPlaneConfig(
            retry_budget_frac=0.1, min_retry_concurrency=2, outliers=OutlierConfig(enabled=False)
        ),
    )
    cp.add_instance(ExecutionInstance("a", max_concurrent_requests=100), 0.0)
    ended: dict[str, str] = {}
    cp.terminal_listeners.append(lambda r: ended.__setitem__(r.request_id, r.reason))
    for i in range(40):
        cp.on_arrival(req(f"r{i}"), 0.0)
    dispatches = 0
    while cp.num_active:
        out = cp.dispatch(0.0)
        dispatches += len(out)
        for d in out:
            cp.on_failure(d.request_id, 0.0, "HTTP 503", True, "a")
    assert len(ended) == 40
    over = [r for r in ended.values() if "retry budget is spent" in r]
    assert over and all("HTTP 503" in r and "retry_budget_frac=0.1" in r for r in over)
    assert dispatches < 40 * 1.5  # against 40 x max_attempts = 120 without a budget


def test_failures_age_out_so_an_instance_avoided_for_its_errors_is_tried_again() -> None:
    cp = make_cp(router="load_balanced", outliers=OutlierConfig(enabled=False, window_s=5.0))
    cp.on_arrival(req("a"), 0.0)
    assert [d.instance_id for d in cp.dispatch(0.0)] == ["bad"]  # both idle: the first
    cp.on_failure("a", 0.0, "HTTP 500", True, "bad")
    cp.dispatch(0.0)  # "a" again, on "good", where it stays
    cp.on_arrival(req("b"), 1.0)
    assert [d.instance_id for d in cp.dispatch(1.0)] == ["good"]
    cp.on_arrival(req("c"), 6.0)  # the failure is older than window_s: "bad" looks idle
    assert [d.instance_id for d in cp.dispatch(6.0)] == ["bad"]
    assert cp.instance_state("bad").view().recent_error_rate == 0.0


def test_outlier_config_names_a_bad_value() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        OutlierConfig(failure_rate=1.5)
    with pytest.raises(ValueError, match="min_requests=30"):
        OutlierConfig(window=20, min_requests=30)
    with pytest.raises(TypeError, match="OutlierConfig"):
        ControlPlaneConfig(outliers={"enabled": False})  # type: ignore[arg-type]


def test_manager_shows_ejection_in_instance_metrics_and_status() -> None:
    async def main() -> None:
        cp = ControlPlaneManager(
            backend=ScriptedBackend(),
            routing_strategy="round_robin",
            config=ControlPlaneConfig(outliers=OutlierConfig(consecutive_failures=1)),
            enable_monitoring=False,
        )
        cp.register_instance(ExecutionInstance("a"))
        cp.register_instance(ExecutionInstance("b"))
        await cp.start()
        cp.core.on_arrival(req("x"), cp._now())
        (d,) = cp.core.dispatch(cp._now())
        cp.core.on_failure("x", cp._now(), "HTTP 500", True, d.instance_id)
        metrics = cp.get_instance_metrics(d.instance_id)
        status = cp.get_status()
        await cp.stop()
        assert metrics["ejected"] and metrics["ejection_reason"] == "1 consecutive failures"
        assert 29.0 < metrics["ejected_for_s"] <= 30.0 and metrics["error_rate"] == 1.0
        assert status["available_instances"] == 1
        assert status["ejected_instances"][d.instance_id]["reason"] == "1 consecutive failures"

    asyncio.run(main())


def test_timed_out_waits_leave_no_waiter_behind() -> None:
    async def main() -> None:
        cp = ControlPlaneManager(backend=ScriptedBackend(), enable_monitoring=False)
        await cp.start()  # no instance: the request stays queued
        await cp.submit_request(req("stuck"))
        for _ in range(1000):
            with pytest.raises(TimeoutError):
                await cp.wait_for_request("stuck", timeout_s=0)
        assert cp._waiters == {}
        await cp.stop()

    asyncio.run(main())
