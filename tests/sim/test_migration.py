"""Migration of running decodes in the simulator: the hand-over's timing in closed form,
every fault point of a move (the request ends once, with all its tokens when it completes,
and no replica keeps it), and a rebalancing run in which nothing is lost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from backends.sim.cluster import ClusterSimulation, KVLink
from backends.sim.faults import Fault
from cpsim.core import ControlPlane
from cpsim.latency import StepBatch
from cpsim.views import DecodeView, InstanceView
from cpsim.workload import PoissonArrivals, SyntheticWorkload, UniformLengths
from policies.migration.kv_balance import KVBalancePolicy
from policies.routing.round_robin import RoundRobinRouter
from policies.scheduling.fifo import FIFOPolicy
from tests.sim.test_cluster import LATENCY, MODEL, by_id, req, spec

LINK = KVLink(bandwidth_gbps=10.0, latency_ms=1.0)  # 10 Gb/s: a copy takes steps' time
PREFILL_S = LATENCY.step_time_s(StepBatch(1000, 1000 * 1000, 0, 1))


class Once:
    """A scripted migration policy: the given moves at its first tick, then none."""

    name = "once"

    def __init__(self, moves: list[tuple[str, str]], interval_s: float) -> None:
        self.moves = moves
        self.interval_s = interval_s
        self.seen: dict[str, list[DecodeView]] = {}

    def plan(
        self,
        instances: Sequence[InstanceView],
        decoding: Mapping[str, Sequence[DecodeView]],
        now: float,
    ) -> list[tuple[str, str]]:
        moves, self.moves = self.moves, []
        if moves:
            self.seen = {k: list(v) for k, v in decoding.items()}
        return moves


def run(specs, requests, migration, **kwargs):  # type: ignore[no-untyped-def]
    cp = ControlPlane(FIFOPolicy(), kwargs.pop("router", None) or RoundRobinRouter())
    sim = ClusterSimulation(specs, cp, kv_link=LINK, migration=migration, **kwargs)
    return sim.run(requests), sim


def decode_s(context: int) -> float:
    return LATENCY.step_time_s(StepBatch(num_decode_seqs=1, decode_context_tokens=context))


def test_a_lone_decode_moves_with_its_whole_context_and_all_its_tokens() -> None:
    policy = Once([("x", "b")], interval_s=0.1)
    result, sim = run([spec("a"), spec("b")], [(0.0, req("x", 1000, 40))], policy)
    row = by_id(result).loc["x"]
    assert row["status"] == "COMPLETED"
    assert row["num_output_tokens"] == 40
    assert row["instance_id"] == "b"
    assert row["num_migrations"] == 1
    seen = policy.seen["a"][0]  # what the policy was shown at 0.1 s: tokens made by then
    ends = PREFILL_S + np.cumsum([decode_s(1000 + j) for j in range(1, 40)])
    made = 1 + int((ends <= 0.1).sum())
    assert (seen.num_context_tokens, seen.num_remaining_tokens) == (1000 + made, 40 - made)
    assert seen.kv_frac == pytest.approx(-(-(1000 + made) // 16) / 4096)
    # the request stops only for the last copy: a few tokens' KV over the link (its latency
    # and then bytes), so its downtime is the link's latency and a little more
    downtime_s = row["migration_downtime_s"]
    assert (
        LINK.latency_ms / 1000 < downtime_s < LINK.transfer_s(2 * 16 * MODEL.kv_bytes_per_token())
    )
    info = result.info["migrations"]
    assert (info["started"], info["handed_over"], info["given_up"]) == (1, 1, 0)
    # it took the whole copy's time and the downtime longer than it would have where it was
    stay, _ = run([spec("a"), spec("b")], [(0.0, req("x", 1000, 40))], None)
    assert row["latency_ms"] > by_id(stay).loc["x"]["latency_ms"]
    for proc in sim.procs.values():
        snap = proc.snapshot()
        assert snap.num_running == snap.num_waiting == 0 and snap.kv_cache_usage_frac == 0.0


@dataclass
class Case:
    faults: dict[str, list[Fault]]
    status: str
    instance: str | None
    handed_over: int
    resumed: int = 0


# the move starts at 0.1 s (after the prefill); the first copy of ~1000 tokens' KV over
# 10 Gb/s takes about 0.1 s, then short copies, then the stop for the last one
COPY_S = LINK.transfer_s(1000 * MODEL.kv_bytes_per_token())
CASES = {
    "nothing fails": Case({}, "COMPLETED", "b", 1),
    # the target dies while the KV is copied: the move is given up, the request stays
    "the target dies during the copy": Case(
        {"b": [Fault("crash", 0.1 + COPY_S / 2)]}, "COMPLETED", "a", 0
    ),
    # the source dies during the copy: the request is lost with it (its tokens were
    # streamed), and the target's slot is let go
    "the source dies during the copy": Case(
        {"a": [Fault("crash", 0.1 + COPY_S / 2)]}, "FAILED", None, 0
    ),
    # the target is down before the move: the core refuses it
    "the target is down before the move": Case({"b": [Fault("crash", 0.05)]}, "COMPLETED", "a", 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_move_ends_whatever_fails_and_no_replica_keeps_the_request(name: str) -> None:
    case = CASES[name]
    specs = [spec(i, faults=case.faults.get(i, [])) for i in ("a", "b")]
    result, sim = run(
        specs, [(0.0, req("x", 1000, 400))], Once([("x", "b")], 0.1), drain_timeout_s=60.0
    )
    df = by_id(result)
    assert list(df.index) == ["x"]  # it ended once
    row = df.loc["x"]
    assert row["status"] == case.status, row["reason"]
    if case.status == "COMPLETED":
        assert row["num_output_tokens"] == 400
        assert row["instance_id"] == case.instance
    info = result.info["migrations"]
    assert info["handed_over"] == case.handed_over
    assert sim.cp.num_migrating == 0
    for iid, proc in sim.procs.items():
        assert sim.cp.instance_state(iid).incoming == set()  # no slot held for nothing
        snap = proc.snapshot()
        assert snap.num_running == snap.num_waiting == 0


def test_a_target_lost_in_the_last_copy_leaves_the_request_resumed_on_its_source() -> None:
    """The source stops the request, the target dies during the last copy: the request
    runs on where it was, with every token."""
    policy = Once([("x", "b")], 0.1)
    cp = ControlPlane(FIFOPolicy(), RoundRobinRouter())
    sim = ClusterSimulation([spec("a"), spec("b")], cp, kv_link=LINK, migration=policy)
    migrations = sim.migrations
    assert migrations is not None
    hand_over = migrations._hand_over

    def crash_first(m, r, downtime_s, src, dst):  # type: ignore[no-untyped-def]
        dst.crash("lost during the last copy")
        hand_over(m, r, downtime_s, src, dst)

    migrations._hand_over = crash_first  # type: ignore[method-assign]
    result = sim.run([(0.0, req("x", 1000, 400))])
    row = by_id(result).loc["x"]
    assert row["status"] == "COMPLETED" and row["instance_id"] == "a"
    assert row["num_output_tokens"] == 400
    assert result.info["migrations"]["resumed_on_source"] == 1


def test_rebalancing_under_load_loses_nothing_and_keeps_every_token() -> None:
    """Round-robin onto four replicas of little KV, with kv_balance moving decodes and a
    replica crashing and coming back mid-run: every request ends once, each completed one
    with all its tokens, and no replica or slot is left holding anything."""
    workload = SyntheticWorkload(
        arrival=PoissonArrivals(rate_rps=10.0),
        prompt_lengths=UniformLengths(50, 600),
        output_lengths=UniformLengths(10, 600),
        num_requests=600,
    )
    requests = list(workload.requests(3))
    specs = [spec(f"r{i}", num_gpu_blocks=400) for i in range(3)]
    specs.append(spec("r3", num_gpu_blocks=400, faults=[Fault("crash", 5.0, duration_s=2.0)]))
    result, sim = run(
        specs, requests, KVBalancePolicy(high_usage=0.7, low_usage=0.5, interval_s=0.25)
    )
    df = result.requests
    assert sorted(df["request_id"]) == sorted(m.request_id for _, m in requests)
    done = df[df["status"] == "COMPLETED"]
    wanted = {m.request_id: m.max_tokens for _, m in requests}
    assert (done["num_output_tokens"] == done["request_id"].map(wanted)).all()
    info = result.info["migrations"]
    assert info["handed_over"] > 50  # it did move requests
    assert done["num_migrations"].fillna(0).sum() == info["handed_over"]
    assert sim.cp.num_migrating == 0
    for iid, proc in sim.procs.items():
        assert sim.cp.instance_state(iid).incoming == set()
        snap = proc.snapshot()
        assert snap.num_running == snap.num_waiting == 0


def test_recompute_copies_nothing_and_pays_a_prefill_of_the_context_on_the_target() -> None:
    """What a control plane can do with vLLM engines: stop the request, prefill prompt and
    output so far again on the target. Nothing crosses the link; the pause is a prefill."""
    cp = ControlPlane(FIFOPolicy(), RoundRobinRouter())
    policy = Once([("x", "b")], interval_s=0.1)
    sim = ClusterSimulation(
        [spec("a"), spec("b")], cp, kv_link=LINK, migration=policy, migration_mechanism="recompute"
    )
    result = sim.run([(0.0, req("x", 1000, 40))])
    row = by_id(result).loc["x"]
    assert row["status"] == "COMPLETED" and row["instance_id"] == "b"
    assert row["num_output_tokens"] == 40
    info = result.info["migrations"]
    assert info["handed_over"] == 1 and info["gb_copied"] == 0.0
    copied, _ = run([spec("a"), spec("b")], [(0.0, req("x", 1000, 40))], Once([("x", "b")], 0.1))
    # the re-prefill of ~1000 tokens costs more than the KV copy's stop
    extra_s = (row["latency_ms"] - by_id(copied).loc["x"]["latency_ms"]) / 1000
    context = policy.seen["a"][0].num_context_tokens
    assert context > 1000
    assert extra_s > 0.5 * LATENCY.step_time_s(StepBatch(context, context * context, 0, 1))


def test_an_unknown_mechanism_names_what_is_allowed() -> None:
    cp = ControlPlane(FIFOPolicy(), RoundRobinRouter())
    with pytest.raises(ValueError, match="kv_copy"):
        ClusterSimulation([spec("a")], cp, migration=Once([], 1.0), migration_mechanism="rdma")
