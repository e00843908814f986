"""A/B tests: the traffic split (policies/scheduling/ab_test.py) and the comparison with its
significance tests (experiments/abtest.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from experiments import abtest
from experiments.api import simulate
from policies.scheduling.ab_test import ABTestPolicy

Make = Callable[..., Any]


def test_a_request_split_sends_its_share_to_b_and_always_the_same_arm(make_request: Make) -> None:
    policy = ABTestPolicy(fraction_b=0.3)
    views = [make_request(f"r{i}", user_id=f"u{i % 7}") for i in range(4000)]
    arms = [policy.arm_of(v).label for v in views]
    assert arms.count("B") / len(arms) == pytest.approx(0.3, abs=0.03)
    assert arms == [ABTestPolicy(fraction_b=0.3).arm_of(v).label for v in views]  # stable


def test_a_user_split_keeps_each_user_in_one_arm(make_request: Make) -> None:
    policy = ABTestPolicy(split="user")
    views = [make_request(f"r{i}", user_id=f"u{i % 50}") for i in range(1000)]
    by_user: dict[str, set[str]] = {}
    for v in views:
        by_user.setdefault(v.user_id, set()).add(policy.arm_of(v).label)
    assert all(len(arms) == 1 for arms in by_user.values())
    assert {a for arms in by_user.values() for a in arms} == {"A", "B"}
    assert {ABTestPolicy(fraction_b=0.0).arm_of(v).label for v in views} == {"A"}
    assert {ABTestPolicy(fraction_b=1.0).arm_of(v).label for v in views} == {"B"}


def test_each_arm_orders_its_own_requests_and_places_with_its_router(
    make_request: Make, make_instance: Make
) -> None:
    policy = ABTestPolicy(
        arm_a={"policy": "fifo", "router": "round_robin"},
        arm_b={"policy": "priority", "router": "load_balanced"},
    )
    queue = [make_request(f"r{i}", arrival_s=0.1 * i, priority=("low", "critical")[i % 2])
             for i in range(20)]  # fmt: skip
    ordered = policy.order(queue, [make_instance()], 5.0)
    assert sorted(r.request_id for r in ordered) == sorted(r.request_id for r in queue)
    for label in ("A", "B"):
        mine = [r for r in ordered if policy.arm_of(r).label == label]
        arm = policy.arms[label == "B"]
        assert mine == list(arm.policy.order(mine, [make_instance()], 5.0))
    busy, idle = make_instance("busy", in_flight=5), make_instance("idle")
    for request in queue:
        placement = policy.place(request, [busy, idle], router=None, now=5.0)  # type: ignore[arg-type]
        arm = policy.arm_of(request)
        assert placement is not None and placement.policy.startswith(f"{arm.label}:")
        if arm.label == "B":  # its load-balanced router takes the idle one
            assert placement.instance_id == "idle"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "session"}, "split='session' is not one of: request, user"),
        ({"fraction_b": 1.5}, "fraction_b"),
        ({"arm_a": {"policy": "edf"}}, "unknown scheduling policy 'edf'"),
        ({"arm_b": {"policy": "fifo", "weight": 2}}, "arm B keys \\['weight'\\] are unknown"),
    ],
)
def test_bad_arms_name_the_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ABTestPolicy(**kwargs)


# ---------------------------------------------------------------- the comparison
def records(ttft_ms: np.ndarray, good: np.ndarray) -> pd.DataFrame:
    n = ttft_ms.size
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "status": np.where(good, "COMPLETED", "FAILED"),
            "slo_met": [bool(g) for g in good],
            "ttft_ms": np.where(good, ttft_ms, np.nan),
        }
    )


def test_a_clearly_better_arm_is_found_better() -> None:
    rng = np.random.default_rng(0)
    ttft = rng.lognormal(5.0, 0.5, 2000)
    good_a = rng.random(2000) < 0.80
    good_b = good_a | (rng.random(2000) < 0.5)  # B serves well all A did, and more
    out = abtest.table(abtest.compare_paired(records(ttft, good_a), records(0.6 * ttft, good_b)))
    assert (out["verdict"] == "B is better").all()
    assert out.loc["goodput share (paired)", "p"] < 1e-6


def test_a_tiny_difference_on_a_small_sample_says_how_many_requests_it_needs() -> None:
    rng = np.random.default_rng(1)
    ttft = rng.lognormal(5.0, 0.5, 200)
    noise = rng.lognormal(0.0, 0.2, 200)
    comparisons = abtest.compare_paired(
        records(ttft, np.ones(200, bool)), records(1.01 * ttft * noise, np.ones(200, bool))
    )
    p50 = next(c for c in comparisons if c.metric.startswith("TTFT p50"))
    assert not p50.significant and p50.needed_n is not None and p50.needed_n > 200
    assert "200 requests are too few" in p50.verdict
    goodput = comparisons[0]
    assert goodput.verdict == "no difference seen"  # every request good in both arms


def test_mcnemar_exact_p_values() -> None:
    assert abtest._binom_two_sided(0, 10) == pytest.approx(2 / 1024)
    assert abtest._binom_two_sided(5, 10) == 1.0
    assert abtest._binom_two_sided(0, 0) == 1.0


def test_a_paired_simulation_of_the_same_config_finds_no_difference() -> None:
    out = abtest.table(abtest.run_paired(["policy=fifo"], ["policy=fifo"], ["workload=tiny"]))
    assert (out["B - A"] == 0).all()
    assert (out["verdict"] == "no difference seen").all()


def test_a_split_run_is_compared_arm_by_arm() -> None:
    result = simulate("workload=tiny", "policy=ab_test", "workload.num_requests=400")
    records_ = result.requests
    arms = abtest.arm_of(records_)
    assert set(arms) == {"A", "B"} and (arms == "B").mean() == pytest.approx(0.5, abs=0.1)
    out = abtest.table(abtest.compare_split(records_))
    assert list(out.index) == [
        "goodput share (split)", "TTFT p50 ms (split)", "TTFT p99 ms (split)"
    ]
    with pytest.raises(ValueError, match="no A:/B: arms in column 'policy'"):
        abtest.compare_split(simulate("workload=tiny").requests)
