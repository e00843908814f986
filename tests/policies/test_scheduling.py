"""Scheduling policies: queue order and placement on hand-made views, and end-to-end runs."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from cpsim.protocols import LatencyEstimate, Placement
from cpsim.types import RequestPriority
from cpsim.views import InstanceView, RequestView
from policies import ROUTERS, SCHEDULING_POLICIES, make_policy, make_router
from policies.scheduling.adaptive import AdaptivePolicy, cluster_load
from policies.scheduling.cost_optimized import CostOptimizedPolicy
from policies.scheduling.fair_share import FairSharePolicy
from policies.scheduling.priority import PriorityPolicy
from policies.scheduling.slo_aware import SLOAwarePolicy

POLICY_YAMLS = sorted((Path(__file__).resolve().parents[2] / "conf" / "policy").glob("*.yaml"))

Factory = Callable[..., Any]


class FirstRouter:
    """Routes to the first candidate, so a test can tell router placement apart."""

    name = "first"

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        return candidates[0] if candidates else None


class TableLatencyModel:
    """TTFT and TPOT per instance id, in seconds."""

    def __init__(self, table: dict[str, tuple[float, float]]) -> None:
        self.table = table

    def predict(self, request: RequestView, instance: InstanceView) -> LatencyEstimate:
        ttft_s, tpot_s = self.table[instance.instance_id]
        return LatencyEstimate(ttft_s, tpot_s)


def order_ids(
    policy: Any, queue: list[RequestView], instances: list[InstanceView], now: float
) -> list[str]:
    return [r.request_id for r in policy.order(queue, instances, now)]


# ---------------------------------------------------------------- registry and configs


def test_unknown_policy_lists_the_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"unknown scheduling policy 'edf'.*slo_aware"):
        make_policy("edf")


@pytest.mark.parametrize("path", POLICY_YAMLS, ids=lambda p: p.stem)
def test_yaml_builds_the_registered_policy(path: Path, from_yaml: Callable[..., Any]) -> None:
    policy, cls, _ = from_yaml(path)
    assert SCHEDULING_POLICIES[path.stem] is cls
    assert policy.name == path.stem


def test_every_policy_has_a_yaml() -> None:
    assert {p.stem for p in POLICY_YAMLS} == set(SCHEDULING_POLICIES)


@pytest.mark.parametrize("name", sorted(SCHEDULING_POLICIES))
def test_order_keeps_every_request(
    name: str, make_request: Factory, make_instance: Factory
) -> None:
    queue = [
        make_request(
            f"r{k}",
            arrival_s=0.1 * k,
            priority=RequestPriority(k % 4),
            slo_deadline_ms=None if k % 2 else 50.0 * k + 1,
        )
        for k in range(12)
    ]
    ordered = make_policy(name).order(queue, [make_instance()], 1.0)
    assert sorted(r.request_id for r in ordered) == sorted(r.request_id for r in queue)


@pytest.mark.parametrize("policy_name", sorted(SCHEDULING_POLICIES))
@pytest.mark.parametrize("router_name", sorted(ROUTERS))
def test_control_plane_runs_end_to_end(policy_name: str, router_name: str, drive: Factory) -> None:
    records = drive(make_policy(policy_name), make_router(router_name))
    assert len(records) == 12
    assert set(records["status"].astype(str)) == {"COMPLETED"}
    # an A/B test records each request's arm and the arm's policy (A:fifo, B:slo_aware)
    prefix = r"[AB]:" if policy_name == "ab_test" else policy_name
    assert records["policy"].astype(str).str.match(prefix).all()


# ---------------------------------------------------------------- priority

P = RequestPriority

# (queue as (id, priority, arrival_s), now, aging_s, expected order)
PRIORITY_ORDER_CASES = [
    (
        "same priority: arrival",
        [("r1", P.NORMAL, 0.0), ("r2", P.NORMAL, 1.0)],
        2.0,
        30.0,
        ["r1", "r2"],
    ),
    (
        "priority first",
        [("r1", P.LOW, 0.0), ("r2", P.NORMAL, 0.5), ("r3", P.CRITICAL, 1.0), ("r4", P.HIGH, 1.5)],
        2.0,
        30.0,
        ["r3", "r4", "r2", "r1"],
    ),
    (
        "not waited long enough",
        [("r1", P.LOW, 0.0), ("r2", P.NORMAL, 20.0)],
        29.0,
        30.0,
        ["r2", "r1"],
    ),
    (
        "aged one level: ties, earlier arrival wins",
        [("r1", P.LOW, 0.0), ("r2", P.NORMAL, 20.0)],
        30.0,
        30.0,
        ["r1", "r2"],
    ),
    (
        "aged past a fresh HIGH",
        [("r1", P.LOW, 0.0), ("r2", P.HIGH, 90.0)],
        90.0,
        30.0,
        ["r1", "r2"],
    ),
    ("faster aging", [("r1", P.LOW, 0.0), ("r2", P.CRITICAL, 3.0)], 3.0, 1.0, ["r1", "r2"]),
    ("no aging", [("r1", P.LOW, 0.0), ("r2", P.HIGH, 900.0)], 900.0, float("inf"), ["r2", "r1"]),
]


@pytest.mark.parametrize(
    ("case", "queue", "now", "aging_s", "expected"),
    PRIORITY_ORDER_CASES,
    ids=[c[0] for c in PRIORITY_ORDER_CASES],
)
def test_priority_order(
    case: str,
    queue: list[tuple[str, RequestPriority, float]],
    now: float,
    aging_s: float,
    expected: list[str],
    make_request: Factory,
    make_instance: Factory,
) -> None:
    views = [make_request(rid, priority=prio, arrival_s=t) for rid, prio, t in queue]
    assert order_ids(PriorityPolicy(aging_s=aging_s), views, [make_instance()], now) == expected


def test_low_cannot_starve_behind_a_stream_of_high(
    make_request: Factory, make_instance: Factory
) -> None:
    policy = PriorityPolicy(aging_s=30.0)
    low = make_request("r0", priority="low", arrival_s=0.0)
    first_at = None
    for step in range(1, 200):
        now = float(step)
        fresh = [make_request(f"r{step}", priority="high", arrival_s=now)]
        if order_ids(policy, [low, *fresh], [make_instance()], now)[0] == "r0":
            first_at = now
            break
    assert first_at == 60.0  # two levels up: LOW -> HIGH, then the earlier arrival wins


@pytest.mark.parametrize(
    ("priority", "arrival_s", "expected"),
    [
        ("critical", 0.0, "idle"),  # urgent: takes the least loaded itself
        ("high", 0.0, "idle"),
        ("normal", 0.0, "busy"),  # goes where the router says
        ("low", 0.0, "busy"),
        ("normal", -30.0, "idle"),  # aged to HIGH
    ],
)
def test_priority_placement(
    priority: str, arrival_s: float, expected: str, make_request: Factory, make_instance: Factory
) -> None:
    cands = [make_instance("busy", in_flight=5), make_instance("idle", in_flight=1)]
    placement = PriorityPolicy().place(
        make_request(priority=priority, arrival_s=arrival_s), cands, FirstRouter(), 0.0
    )
    assert placement == Placement("" + expected, policy="priority")


def test_priority_validates() -> None:
    with pytest.raises(ValueError, match="aging_s=0"):
        PriorityPolicy(aging_s=0)


# ---------------------------------------------------------------- slo aware

FAST_SLOW = TableLatencyModel({"fast": (0.5, 0.0), "slow": (5.0, 0.0)})

# (queue as (id, slo_deadline_ms or None, arrival_s, max_tokens), now, expected order)
SLO_ORDER_CASES = [
    (
        "least slack first, then no SLO, then infeasible",
        [
            ("r1", 10_000.0, 0.0, 1),
            ("r2", None, 0.0, 1),
            ("r3", 300.0, 0.0, 1),
            ("r4", 2_000.0, 0.0, 1),
        ],
        0.0,
        ["r4", "r1", "r2", "r3"],
    ),
    (
        "feasible on the best instance only counts as feasible",
        [("r1", None, 0.0, 1), ("r2", 600.0, 0.0, 1)],
        0.0,
        ["r2", "r1"],
    ),
    (
        "slack shrinks with time: now infeasible, demoted",
        [("r1", None, 0.0, 1), ("r2", 600.0, 0.0, 1)],
        0.2,
        ["r1", "r2"],
    ),
    (
        "infeasible among themselves by arrival, not deadline",
        [("r1", 1_000.0, 0.5, 1), ("r2", 100.0, 1.0, 1), ("r3", 5_000.0, 1.5, 1)],
        2.0,
        ["r3", "r1", "r2"],
    ),
    (
        "least laxity, not earliest deadline: longer service is more urgent",
        [("r1", 2_000.0, 0.0, 1), ("r2", 3_000.0, 0.0, 41)],  # tpot 0.05: r2 needs 2.5 s
        0.0,
        ["r2", "r1"],
    ),
]


@pytest.mark.parametrize(
    ("case", "queue", "now", "expected"), SLO_ORDER_CASES, ids=[c[0] for c in SLO_ORDER_CASES]
)
def test_slo_aware_order(
    case: str,
    queue: list[tuple[str, float | None, float, int]],
    now: float,
    expected: list[str],
    make_request: Factory,
    make_instance: Factory,
) -> None:
    model = TableLatencyModel({"fast": (0.5, 0.05), "slow": (5.0, 0.5)})
    views = [
        make_request(rid, slo_deadline_ms=slo, arrival_s=t, max_tokens=n)
        for rid, slo, t, n in queue
    ]
    instances = [make_instance("slow"), make_instance("fast")]
    assert order_ids(SLOAwarePolicy(model), views, instances, now) == expected


def test_slo_aware_ignores_unhealthy_and_other_models_when_predicting(
    make_request: Factory, make_instance: Factory
) -> None:
    instances = [
        make_instance("fast", is_healthy=False),
        make_instance("slow"),
    ]
    policy = SLOAwarePolicy(FAST_SLOW)
    queue = [make_request("r1"), make_request("r2", slo_deadline_ms=1_000.0)]
    assert order_ids(policy, queue, instances, 0.0) == ["r1", "r2"]  # only slow counts: infeasible
    other_model = [make_instance("fast", model_name="other"), make_instance("slow")]
    queue = [make_request("r1"), make_request("r2", slo_deadline_ms=1_000.0, model_name="m")]
    assert order_ids(policy, queue, other_model, 0.0) == ["r1", "r2"]


@pytest.mark.parametrize(
    ("slo_deadline_ms", "expected"),
    [(1_000.0, "fast"), (100.0, "fast"), (None, "slow")],  # no SLO: the router (first) decides
)
def test_slo_aware_placement(
    slo_deadline_ms: float | None, expected: str, make_request: Factory, make_instance: Factory
) -> None:
    cands = [make_instance("slow"), make_instance("fast", in_flight=5)]
    placement = SLOAwarePolicy(FAST_SLOW).place(
        make_request(slo_deadline_ms=slo_deadline_ms), cands, FirstRouter(), 0.0
    )
    assert placement is not None and placement.instance_id == expected


# ---------------------------------------------------------------- cost optimized

# cheap: 1 GPU x $1/h, 10 s -> $0.0027778; quick: 4 GPUs x $3/h, 2 s -> $0.0066667
COST_MODEL = TableLatencyModel({"cheap": (10.0, 0.0), "quick": (2.0, 0.0)})
CHEAP_USD = 1.0 * 10.0 / 3600
QUICK_USD = 12.0 * 2.0 / 3600

# (request kwargs, now, expected instance or None, expected predicted cost)
COST_CASES = [
    ("no SLO, no budget: cheapest", {}, 0.0, "cheap", CHEAP_USD),
    ("SLO the cheap one misses", {"slo_deadline_ms": 5_000.0}, 0.0, "quick", QUICK_USD),
    ("SLO both meet", {"slo_deadline_ms": 20_000.0}, 0.0, "cheap", CHEAP_USD),
    ("slack counted from now", {"slo_deadline_ms": 12_000.0}, 5.0, "quick", QUICK_USD),
    (
        "budget excludes the one meeting the SLO",
        {"slo_deadline_ms": 5_000.0, "cost_budget": 0.005},
        0.0,
        "cheap",
        CHEAP_USD,
    ),
    (
        "budget fits both",
        {"slo_deadline_ms": 5_000.0, "cost_budget": 0.01},
        0.0,
        "quick",
        QUICK_USD,
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "now", "expected", "cost"), COST_CASES, ids=[c[0] for c in COST_CASES]
)
def test_cost_optimized_placement(
    case: str,
    kwargs: dict[str, Any],
    now: float,
    expected: str,
    cost: float,
    make_request: Factory,
    make_instance: Factory,
) -> None:
    cands = [
        make_instance("quick", gpu_count=4, cost_per_gpu_hour=3.0),
        make_instance("cheap", gpu_count=1, cost_per_gpu_hour=1.0),
    ]
    placement = CostOptimizedPolicy(COST_MODEL).place(
        make_request(**kwargs), cands, FirstRouter(), now
    )
    assert placement is not None and placement.instance_id == expected
    assert placement.predicted_cost_usd == pytest.approx(cost)
    assert placement.reject_reason is None and placement.policy == "cost_optimized"


def test_cost_optimized_rejects_over_budget(make_request: Factory, make_instance: Factory) -> None:
    cands = [
        make_instance("quick", gpu_count=4, cost_per_gpu_hour=3.0),
        make_instance("cheap", cost_per_gpu_hour=1.0),
    ]
    placement = CostOptimizedPolicy(COST_MODEL).place(
        make_request(cost_budget=0.001), cands, FirstRouter(), 0.0
    )
    assert placement is not None and placement.instance_id is None
    assert placement.reject_reason is not None
    assert "cost_budget=0.001" in placement.reject_reason
    assert "0.00277778" in placement.reject_reason and "cheap" in placement.reject_reason


def test_cost_optimized_ties_follow_the_hint_then_load(
    make_request: Factory, make_instance: Factory
) -> None:
    model = TableLatencyModel({"a": (1.0, 0.0), "b": (1.0, 0.0), "c": (1.0, 0.0)})
    cands = [
        make_instance("a", in_flight=3),
        make_instance("b", in_flight=1),
        make_instance("c", data_parallel_size=2, gpu_count=1, in_flight=2),
    ]
    policy = CostOptimizedPolicy(model)
    assert policy.place(make_request(), cands, FirstRouter(), 0.0).instance_id == "b"
    assert (
        policy.place(
            make_request(parallelism_hint="data_parallel"), cands, FirstRouter(), 0.0
        ).instance_id
        == "c"
    )


def test_cost_optimized_rejection_ends_the_request(make_instance: Factory) -> None:
    from cpsim.core import ControlPlane
    from cpsim.types import ExecutionInstance, RequestMetadata

    cp = ControlPlane(CostOptimizedPolicy(), make_router("round_robin"))
    cp.add_instance(ExecutionInstance("a"), 0.0)
    cp.on_arrival(RequestMetadata("r1", num_prompt_tokens=10, cost_budget=0.0), 0.0)
    assert cp.dispatch(0.0) == []
    records = cp.metrics.records()
    assert records["status"].astype(str).tolist() == ["REJECTED"]
    assert "cost_budget=0.0" in str(records["reason"].iloc[0])


# ---------------------------------------------------------------- adaptive


def cluster_at(make_instance: Factory, load: float) -> list[InstanceView]:
    """Two instances of capacity 100 at ``load`` each (an empty queue adds nothing)."""
    return [
        make_instance(f"i{k}", in_flight=round(100 * load), max_concurrent_requests=100)
        for k in range(2)
    ]


def test_cluster_load_counts_the_queue(make_request: Factory, make_instance: Factory) -> None:
    instances = [
        make_instance("a", in_flight=5, max_concurrent_requests=10),
        make_instance("b", max_concurrent_requests=10),
        make_instance("x", is_healthy=False),
    ]
    queue = [make_request(f"r{k}") for k in range(4)]
    assert cluster_load(queue, instances) == pytest.approx(0.25 + 4 / 20)
    assert cluster_load(queue, [make_instance(is_healthy=False)]) is None


# (load sequence, expected mode after each step) with min_dwell_s = 0
ADAPTIVE_LOAD_CASES = [
    ("enters slo_aware at high load", [0.5, 0.85], ["fifo", "slo_aware"]),
    ("stays inside the gap", [0.85, 0.75, 0.85, 0.71, 0.79, 0.72], ["slo_aware"] * 6),
    ("leaves below high - gap", [0.85, 0.69], ["slo_aware", "fifo"]),
    ("cost_optimized at low load", [0.5, 0.3], ["fifo", "cost_optimized"]),
    ("stays cost_optimized inside the gap", [0.2, 0.35, 0.25, 0.39], ["cost_optimized"] * 4),
    ("leaves cost_optimized above low + gap", [0.2, 0.4], ["cost_optimized", "fifo"]),
    ("medium load: fifo", [0.5, 0.6, 0.7, 0.79], ["fifo"] * 4),
]


@pytest.mark.parametrize(
    ("case", "loads", "modes"), ADAPTIVE_LOAD_CASES, ids=[c[0] for c in ADAPTIVE_LOAD_CASES]
)
def test_adaptive_modes_with_hysteresis(
    case: str, loads: list[float], modes: list[str], make_instance: Factory
) -> None:
    policy = AdaptivePolicy(min_dwell_s=0.0)
    seen = []
    for step, load in enumerate(loads):
        policy.order([], cluster_at(make_instance, load), float(step))
        seen.append(policy.mode)
    assert seen == modes
    assert len(policy.switches) == sum(
        a != b for a, b in zip(["fifo", *modes], modes, strict=False)
    )


def test_adaptive_no_flapping_under_oscillating_load(make_instance: Factory) -> None:
    policy = AdaptivePolicy(min_dwell_s=0.0)
    for step in range(200):
        load = 0.85 if step == 0 else (0.72 if step % 2 else 0.88)  # oscillates inside the gap
        policy.order([], cluster_at(make_instance, load), float(step))
    assert policy.switches == [(0.0, "fifo", "slo_aware")]


def test_adaptive_dwell_time_limits_switches(make_instance: Factory) -> None:
    policy = AdaptivePolicy(min_dwell_s=10.0)
    for step in range(60):
        load = 0.95 if step % 2 else 0.05  # far past both thresholds, every second
        policy.order([], cluster_at(make_instance, load), float(step))
    times = [t for t, _, _ in policy.switches]
    assert len(times) >= 3
    assert all(b - a >= 10.0 for a, b in itertools.pairwise(times))


def test_adaptive_follows_slo_compliance(make_request: Factory, make_instance: Factory) -> None:
    policy = AdaptivePolicy(min_dwell_s=0.0, window_size=20)
    low = cluster_at(make_instance, 0.1)
    policy.order([], low, 0.0)
    assert policy.mode == "cost_optimized"
    for k in range(20):  # 3 misses in 20: compliance 0.85 < 0.9
        policy.observe(make_request(f"r{k}"), k >= 3, 1.0)
    policy.order([], low, 2.0)
    assert policy.mode == "slo_aware"
    for k in range(20, 40):  # the last 20 all met their SLO
        policy.observe(make_request(f"r{k}"), True, 3.0)
    assert policy.compliance_frac() == 1.0
    policy.order([], low, 4.0)
    assert policy.mode == "cost_optimized"
    policy.observe(make_request("r100"), None, 5.0)  # requests without an SLO do not count
    assert policy.compliance_frac() == 1.0


def test_adaptive_compliance_hysteresis(make_request: Factory, make_instance: Factory) -> None:
    policy = AdaptivePolicy(min_dwell_s=0.0, window_size=100)
    medium = cluster_at(make_instance, 0.5)
    for k in range(100):
        policy.observe(make_request(f"r{k}"), k >= 12, 0.0)  # 0.88
    policy.order([], medium, 0.0)
    assert policy.mode == "slo_aware"
    for k in range(4):  # 0.92: above 0.9 but inside the gap
        policy.observe(make_request(f"s{k}"), True, 1.0)
    policy.order([], medium, 1.0)
    assert policy.mode == "slo_aware"


@pytest.mark.parametrize(
    ("priorities", "expected"), [(["high", "low"], "priority"), (["low", "low"], "fifo")]
)
def test_adaptive_priority_mode_for_mixed_queues(
    priorities: list[str], expected: str, make_request: Factory, make_instance: Factory
) -> None:
    policy = AdaptivePolicy(min_dwell_s=0.0)
    queue = [make_request(f"r{k}", priority=p) for k, p in enumerate(priorities)]
    policy.order(queue, cluster_at(make_instance, 0.5), 0.0)
    assert policy.mode == expected


def test_adaptive_tags_placements_with_the_mode(
    make_request: Factory, make_instance: Factory
) -> None:
    policy = AdaptivePolicy(min_dwell_s=0.0)
    policy.order([], cluster_at(make_instance, 0.9), 0.0)
    placement = policy.place(make_request(), [make_instance()], FirstRouter(), 0.0)
    assert placement == Placement("i0", policy="adaptive:slo_aware")


def test_adaptive_orders_like_its_mode(make_request: Factory, make_instance: Factory) -> None:
    policy = AdaptivePolicy(min_dwell_s=0.0)
    queue = [make_request("r1", priority="low"), make_request("r2", priority="critical")]
    assert order_ids(policy, queue, cluster_at(make_instance, 0.5), 0.0) == ["r2", "r1"]  # priority
    assert order_ids(policy, queue, cluster_at(make_instance, 0.1), 1.0) == [
        "r1",
        "r2",
    ]  # cost: arrival


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"low_load_frac": 0.5, "high_load_frac": 0.6}, "bands"),
        ({"min_compliance_frac": 1.2}, "min_compliance_frac"),
        ({"compliance_gap_frac": 0.2}, "compliance_gap_frac"),
        ({"window_size": 0}, "window_size"),
        ({"min_dwell_s": -1.0}, "min_dwell_s"),
        ({"aging_s": 0.0}, "aging_s"),
    ],
)
def test_adaptive_validates(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdaptivePolicy(**kwargs)


# ---------------------------------------------------------------- fair share (VTC)

# (case, FairSharePolicy kwargs, counters before, queue as (id, user, prompt, max_tokens),
#  expected order)
FAIR_ORDER_CASES = [
    (
        "equal counters: one request per user in turn",
        {},
        {},
        [("a1", "a", 100, 50), ("a2", "a", 100, 50), ("a3", "a", 100, 50), ("b1", "b", 100, 50)],
        ["a1", "b1", "a2", "a3"],
    ),
    (
        "the user served least goes first",
        {},
        {"a": 1000.0},
        [("a1", "a", 100, 50), ("b1", "b", 100, 50), ("b2", "b", 100, 50)],
        ["b1", "b2", "a1"],
    ),
    (
        "tokens, not requests: one big request costs as much as several small",
        {},
        {},
        [("a1", "a", 1000, 500), ("a2", "a", 10, 5), ("b1", "b", 10, 5), ("b2", "b", 10, 5),
         ("b3", "b", 10, 5)],
        ["a1", "b1", "b2", "b3", "a2"],
    ),
    (
        "weight 2 gets twice the turns",
        {"weights": {"a": 2.0}},
        {},
        [("a1", "a", 100, 50), ("a2", "a", 100, 50), ("a3", "a", 100, 50), ("b1", "b", 100, 50),
         ("b2", "b", 100, 50)],
        ["a1", "b1", "a2", "a3", "b2"],
    ),
    (
        "tenants share one counter",
        {"tenants": {"acme": ["a", "b"]}},
        {},
        [("a1", "a", 100, 50), ("b1", "b", 100, 50), ("c1", "c", 100, 50), ("c2", "c", 100, 50)],
        ["a1", "c1", "b1", "c2"],
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "counters", "queue", "expected"),
    FAIR_ORDER_CASES,
    ids=[c[0] for c in FAIR_ORDER_CASES],
)
def test_fair_share_order(
    case: str,
    kwargs: dict[str, Any],
    counters: dict[str, float],
    queue: list[tuple[str, str, int, int]],
    expected: list[str],
    make_request: Factory,
) -> None:
    policy = FairSharePolicy(**kwargs)
    policy.counters.update(counters)
    policy._backlogged = {policy.client_of.get(u, u) for _, u, _, _ in queue}  # no lift here
    views = [
        make_request(rid, user_id=u, num_prompt_tokens=p, max_tokens=m, seq=i)
        for i, (rid, u, p, m) in enumerate(queue)
    ]
    assert order_ids(policy, views, [], 0.0) == expected


def test_fair_share_charges_at_placement_and_lifts_a_returning_user(
    make_request: Factory, make_instance: Factory
) -> None:
    policy = FairSharePolicy(input_weight=1.0, output_weight=2.0)
    a1 = make_request("a1", user_id="a", num_prompt_tokens=100, max_tokens=50)
    policy.order([a1], [], 0.0)
    assert policy.place(a1, [make_instance("i0")], FirstRouter(), 0.0) is not None
    assert policy.counters == {"a": 200.0}  # 100 prompt + 2 x 50 output
    # b has been idle; it comes back while a is backlogged: it starts at a's counter, so it
    # cannot spend credit saved while idle to starve a
    policy.order([make_request("a2", user_id="a")], [], 1.0)
    policy.order([make_request("a3", user_id="a"), make_request("b1", user_id="b")], [], 2.0)
    assert policy.counters["b"] == 200.0


def test_fair_share_validates() -> None:
    with pytest.raises(ValueError, match="weights\\['a'\\]"):
        FairSharePolicy(weights={"a": 0.0})
    with pytest.raises(ValueError, match="must be a list of user ids"):
        FairSharePolicy(tenants={"t": "alice"})


def test_a_heavy_user_cannot_starve_a_light_one(flood: Factory) -> None:
    """A user at 40 req/s (10x cluster/small's capacity) beside one at 1 req/s: under FIFO
    the light user's requests wait behind the flood (its median wait grows past a minute);
    under fair sharing they go almost at once, and every request still completes."""
    fifo, _ = flood("policy=fifo")
    fair, sent = flood("policy=fair_share")
    assert len(fair) == len(sent) and (fair.status == "COMPLETED").all()

    def light_wait_s(records: Any) -> float:
        return float(records[records.user_id == "light"].queue_delay_ms.median()) / 1000

    assert light_wait_s(fifo) > 60.0
    assert light_wait_s(fair) < 10.0
