"""Fault recovery in the simulator: a partition between the PD pools with and without the
link breaker, and engines that die (for good, in a crash loop) with and without restarts.
Whatever fails, every request ends once; the recovery policies turn failures into
completions and keep their promises (paths cut and reopened, restarts within bounds)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from backends.sim.cluster import ClusterSimulation, KVLink, ReplicaSpec, RunResult
from backends.sim.faults import Fault
from cpsim.core import ControlPlane
from cpsim.types import RequestMetadata
from policies.pd.threshold import ThresholdPDPolicy
from policies.recovery import BackoffRestart, LinkBreaker
from policies.routing.load_balanced import LoadBalancedRouter
from policies.scheduling.fifo import FIFOPolicy
from tests.sim.test_cluster import spec


def arrivals(
    num: int, every_s: float, prompt: int, out: int
) -> list[tuple[float, RequestMetadata]]:
    return [
        (k * every_s, RequestMetadata(request_id=f"r{k}", num_prompt_tokens=prompt, max_tokens=out))
        for k in range(num)
    ]


def run(
    specs: Sequence[ReplicaSpec],
    requests: list[tuple[float, RequestMetadata]],
    *,
    links: Any = None,
    pd: bool = False,
    **sim: Any,
) -> tuple[pd.DataFrame, RunResult, ClusterSimulation]:
    core = ControlPlane(
        FIFOPolicy(), LoadBalancedRouter(), ThresholdPDPolicy(800) if pd else None, links=links
    )
    cluster = ClusterSimulation(specs, core, drain_timeout_s=600.0, **sim)
    result = cluster.run(requests)
    df = result.requests.set_index("request_id")
    assert sorted(df.index) == sorted(m.request_id for _, m in requests)  # each ended once
    return df, result, cluster


# --------------------------------------------------------------------- partitions
PARTITION = (Fault("link", at_s=2.0, duration_s=4.0),)  # both decode links down, 2 s to 6 s


def pd_cluster() -> list[ReplicaSpec]:
    return [
        spec("p", instance_type="prefilling"),
        spec("d1", instance_type="decoding", faults=PARTITION),
        spec("d2", instance_type="decoding", faults=PARTITION),
    ]


def test_without_a_link_policy_a_partition_between_the_pd_pools_fails_requests() -> None:
    df, _, _ = run(pd_cluster(), arrivals(120, 0.1, 1000, 20), pd=True, kv_link=KVLink())
    assert (df.status == "FAILED").sum() > 0
    assert df[df.status == "FAILED"].reason.str.contains("link of d").all()


def test_the_link_breaker_completes_every_request_through_a_partition_and_reopens_paths() -> None:
    breaker = LinkBreaker(consecutive_failures=2, cut_s=0.5, max_cut_s=2.0)
    df, _, _ = run(pd_cluster(), arrivals(120, 0.1, 1000, 20), pd=True, links=breaker)
    assert (df.status == "COMPLETED").all(), df[df.status != "COMPLETED"].reason.tolist()
    assert (df.num_output_tokens == 20).all()
    arrival = df.arrival_time_s
    during = df[(arrival > 3.0) & (arrival < 5.5)]
    # cut off from the decode pool, they decode where they were prefilled or run whole
    assert not during.decode_instance_id.isin(["d1", "d2"]).any()
    after = df[arrival > 6.0 + 2.0 + 0.5]  # the partition's end, a cut, and a probe
    assert after.decode_instance_id.isin(["d1", "d2"]).all()
    assert breaker.cut_paths(20.0) == []


def test_link_failures_under_a_link_policy_do_not_eject_the_decode_instances() -> None:
    _, _, cluster = run(pd_cluster(), arrivals(120, 0.1, 1000, 20), pd=True, links=LinkBreaker())
    assert cluster.cp.metrics.ejections == []


# --------------------------------------------------------------------- restarts
def test_an_engine_that_died_for_good_serves_again_only_with_a_restart_policy() -> None:
    requests = arrivals(100, 0.1, 200, 20)
    faults = (Fault("crash", at_s=1.0),)
    plain, _, _ = run([spec("a", faults=faults), spec("b")], requests)
    assert (plain[plain.dispatch_time_s > 1.0].instance_id == "b").all()
    restart = BackoffRestart(initial_delay_s=1.0, probation=False)
    df, result, _ = run([spec("a", faults=faults), spec("b")], requests, restart=restart,
                        restart_s=2.0)  # fmt: skip
    assert (df.status != "CANCELLED").all()
    back = df[df.dispatch_time_s > 1.0 + 1.0 + 2.0]
    assert (back.instance_id == "a").any()
    assert not (
        df[(df.dispatch_time_s > 1.0) & (df.dispatch_time_s < 4.0)].instance_id == "a"
    ).any()
    events = [(e["event"], round(e["time_s"], 6)) for e in result.info["recovery"]["events"]]
    assert events == [("crash", 1.0), ("restart", 4.0)]


def test_a_crash_loop_is_restarted_with_growing_delays_then_given_up() -> None:
    loop = (Fault("crashloop", at_s=1.0, duration_s=None, fail_after_s=0.5),)
    restart = BackoffRestart(initial_delay_s=1.0, max_delay_s=3.0, max_restarts=3, window_s=100.0)
    df, result, cluster = run([spec("a", faults=loop), spec("b")], arrivals(200, 0.1, 200, 20),
                              restart=restart, restart_s=0.0)  # fmt: skip
    recovery = result.info["recovery"]
    times = {kind: [e["time_s"] for e in recovery["events"] if e["event"] == kind]
             for kind in ("crash", "restart", "give up")}  # fmt: skip
    # crash at 1; restart 1 s later, crash 0.5 s after; then 2 s, then 3 s (the cap); the
    # fourth crash in the window is one too many
    np.testing.assert_allclose(times["crash"], [1.0, 2.5, 5.0, 8.5])
    np.testing.assert_allclose(times["restart"], [2.0, 4.5, 8.0])
    np.testing.assert_allclose(times["give up"], [8.5])
    assert recovery["given_up"] == ["a"]
    assert not cluster.procs["a"].is_up
    assert (df.status.isin(["COMPLETED", "FAILED"])).all()


def test_probation_keeps_a_crash_loop_from_taking_a_full_share_of_requests_down() -> None:
    loop = (Fault("crashloop", at_s=1.0, duration_s=30.0, fail_after_s=0.5),)
    failed = {}
    for probation in (False, True):
        restart = BackoffRestart(initial_delay_s=1.0, max_delay_s=2.0, max_restarts=50,
                                 probation=probation)  # fmt: skip
        df, _, _ = run([spec("a", faults=loop), spec("b")], arrivals(400, 0.05, 200, 60),
                       restart=restart, restart_s=0.0)  # fmt: skip
        failed[probation] = int((df.status == "FAILED").sum())
    assert failed[True] < failed[False] / 2, failed
