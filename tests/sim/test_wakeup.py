"""Wake-ups on SimPy's queue and on the merged heap: the same order, the same simulation."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
import simpy
import simpy.rt
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sim.faults import Fault
from backends.sim.wakeup import Scheduler
from cpsim.core import ControlPlaneConfig
from cpsim.profiles import ProfiledLatencyModel
from cpsim.workload import LogNormalLengths, PoissonArrivals, RequestMix, SyntheticWorkload
from policies.pd.threshold import ThresholdPDPolicy
from tests.sim.test_cluster import COEFFICIENTS, simulate, spec

# what a schedule holds: ("wake", delay, then) wake-ups, whose callback schedules the ``then``
# items in turn, and ("timeout", delay, then) SimPy timeouts of a process, which do the same
_item = st.tuples(
    st.sampled_from(["wake", "timeout", "urgent"]), st.sampled_from([0.0, 0.5, 1.0, 1.5])
)
schedules = st.lists(
    st.tuples(_item, st.lists(_item, max_size=3)), min_size=1, max_size=12
)


def _order(items: list[Any], merged: bool) -> list[tuple[str, float]]:
    """The order in which the items (and what each schedules when it fires) fire."""
    env = simpy.Environment()
    clock = Scheduler(env, merged=merged)
    assert clock.merged is merged
    fired: list[tuple[str, float]] = []

    def start(label: str, kind: str, delay: float, then: list[Any]) -> None:
        def fire(*_: Any) -> None:
            fired.append((label, clock.now()))
            for k, (kind2, delay2) in enumerate(then):
                start(f"{label}.{k}", kind2, delay2, [])

        if kind == "wake":
            clock.call_later(delay, fire)
        elif kind == "timeout":
            env.timeout(delay).callbacks.append(fire)
        else:  # an event of URGENT priority (a process's start), after a timeout of ``delay``
            def proc() -> Any:
                yield env.timeout(delay)
                env.process(_urgent(fire))
            env.process(proc())

    for i, ((kind, delay), then) in enumerate(items):
        start(str(i), kind, delay, then)
    end = env.timeout(10.0)
    clock.run(end)
    assert env.now == 10.0
    return fired


def _urgent(fire: Any) -> Any:
    fire()
    yield from ()


@settings(max_examples=200, deadline=None)
@given(items=schedules)
def test_merged_heap_fires_in_simpy_order(items: list[Any]) -> None:
    """Ties of time included: a wake-up sorts as a Timeout of normal priority would."""
    assert _order(items, merged=True) == _order(items, merged=False)


def test_same_time_wakeups_fire_in_the_order_scheduled() -> None:
    env = simpy.Environment()
    clock = Scheduler(env, merged=True)
    fired: list[int] = []
    for i in range(50):
        clock.call_later(float(i % 3), lambda _w, i=i: fired.append(i))
    clock.run(env.timeout(5.0))
    assert fired == sorted(range(50), key=lambda i: (i % 3, i))


def test_negative_delay_is_an_error_naming_it() -> None:
    for merged in (True, False):
        clock = Scheduler(simpy.Environment(), merged=merged)
        with pytest.raises(ValueError, match=r"delay_s=-0\.5"):
            clock.call_later(-0.5, lambda _w: None)


def test_merged_environment_run_elsewhere_is_an_error() -> None:
    env = simpy.Environment()
    clock = Scheduler(env, merged=True)
    clock.call_later(1.0, lambda _w: None)
    env.run(until=2.0)  # the wake-up is not on SimPy's queue: it would be skipped
    with pytest.raises(RuntimeError, match=r"must be run only through Scheduler\.run"):
        clock.run(env.timeout(1.0))


def test_run_without_the_until_event_is_an_error() -> None:
    env = simpy.Environment()
    clock = Scheduler(env, merged=True)
    clock.call_later(1.0, lambda _w: None)
    with pytest.raises(RuntimeError, match="No scheduled events left"):
        clock.run(env.event())


def test_a_realtime_environment_keeps_simpys_queue() -> None:
    """Its ``step`` sleeps until the event's time: wake-ups must go through it."""
    env = simpy.rt.RealtimeEnvironment(strict=False)
    clock = Scheduler(env, merged=True)
    assert not clock.merged
    fired: list[float] = []
    clock.call_later(0.01, lambda _w: fired.append(env.now))
    env.run(until=0.02)
    assert fired == [pytest.approx(0.01)]


def _cluster_run(merged: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """PD, faults of each kind, the serving path, retries, queue timeouts, scrapes."""
    path_latency = ProfiledLatencyModel(
        "tiny-llama", "test-gpu", COEFFICIENTS, ingress_s=0.002, egress_s=0.001
    )
    specs = [
        spec("p", instance_type="prefilling", latency=path_latency,
             faults=[Fault("stall", at_s=2.0, duration_s=0.5)]),
        spec("d1", instance_type="decoding", max_concurrent_requests=16,
             faults=[Fault("crash", at_s=3.0, duration_s=1.0)]),
        spec("d2", instance_type="decoding", latency=path_latency,
             faults=[Fault("slowdown", at_s=1.0, duration_s=2.0, factor=2.0)]),
        spec("g", num_gpu_blocks=200, faults=[Fault("crash", at_s=5.0, duration_s=0.5)]),
    ]
    workload = SyntheticWorkload(
        PoissonArrivals(60.0),
        prompt_lengths=LogNormalLengths(median_tokens=600, sigma=1.0, max_tokens=3000),
        output_lengths=LogNormalLengths(median_tokens=60, sigma=0.8, max_tokens=400),
        mix=RequestMix(slo_ms=4000.0, priorities={"normal": 0.7, "high": 0.3}),
        num_requests=400,
    )
    result, _ = simulate(
        specs,
        workload.requests(seed=7),
        pd_policy=ThresholdPDPolicy(800),
        core=ControlPlaneConfig(queue_timeout_s=3.0),
        scrape_interval_s=0.25,
        merged_wakeups=merged,
    )
    return result.requests, result.instances


def test_merged_and_simpy_queues_give_the_same_simulation_bit_for_bit() -> None:
    merged_requests, merged_series = _cluster_run(merged=True)
    plain_requests, plain_series = _cluster_run(merged=False)
    assert set(merged_requests["status"].astype(str)) >= {"COMPLETED", "FAILED"}
    assert (merged_requests["attempts"] > 1).any()
    pd.testing.assert_frame_equal(merged_requests, plain_requests)
    pd.testing.assert_frame_equal(merged_series, plain_series)
