"""Autoscalers (policies/autoscaling/): their targets on hand-made pool views, their YAML."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cpsim.protocols import Autoscaler
from cpsim.views import PoolView
from policies.autoscaling import AUTOSCALERS, make_autoscaler
from policies.autoscaling.predictive import PredictiveScaler
from policies.autoscaling.queue_slo import QueueSLOScaler
from policies.autoscaling.utilization import TargetUtilizationScaler

YAMLS = sorted((Path(__file__).resolve().parents[2] / "conf" / "autoscaling").glob("*.yaml"))


def pool(**changes: Any) -> PoolView:
    """Four serving instances of 10 requests each, half busy, nothing queued, at t=100 s."""
    base: dict[str, Any] = {
        "pool": "engine",
        "time_s": 100.0,
        "interval_s": 10.0,
        "num_ready": 4,
        "num_starting": 0,
        "num_draining": 0,
        "min_instances": 1,
        "max_instances": 10,
        "max_concurrent_per_instance": 10,
        "queued": 0,
        "in_flight": 20,
        "arrivals_per_s": 2.0,
        "completions_per_s": 2.0,
        "slo_attainment": 1.0,
        "mean_latency_s": 5.0,
    }
    return PoolView(**{**base, **changes})


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_builds_the_registered_scaler(path: Path, from_yaml: Callable[..., Any]) -> None:
    scaler, cls, _ = from_yaml(path)
    assert AUTOSCALERS[path.stem] is cls and isinstance(scaler, Autoscaler)


def test_every_scaler_has_a_yaml_and_unknown_names_list_the_known() -> None:
    assert {p.stem for p in YAMLS} == set(AUTOSCALERS)
    with pytest.raises(ValueError, match="unknown autoscaler 'hpa'; allowed: predictive"):
        make_autoscaler("hpa")


# (case, TargetUtilizationScaler kwargs, pool changes, expected target)
UTILIZATION_CASES = [
    ("at the target: unchanged", {"target_utilization": 0.5}, {}, 4),
    ("within tolerance: unchanged", {"target_utilization": 0.55}, {}, 4),
    ("busy: out in proportion", {"target_utilization": 0.5}, {"in_flight": 40}, 8),
    ("the queue is demand too", {"target_utilization": 0.5}, {"in_flight": 40, "queued": 20}, 12),
    ("idle: in", {"target_utilization": 0.5, "scale_in_window_s": 0.0}, {"in_flight": 5}, 1),
    (
        "starting instances count as provisioned",
        {"target_utilization": 0.5},
        {"num_ready": 2, "num_starting": 2, "in_flight": 20},
        4,
    ),
    (
        "nothing serves yet, requests wait: one",
        {},
        {"num_ready": 0, "in_flight": 0, "queued": 3},
        1,
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "changes", "expected"),
    UTILIZATION_CASES,
    ids=[c[0] for c in UTILIZATION_CASES],
)
def test_target_utilization(case: str, kwargs: dict, changes: dict, expected: int) -> None:
    assert TargetUtilizationScaler(**kwargs).target(pool(**changes)) == expected


def test_target_utilization_scales_in_only_after_its_window() -> None:
    scaler = TargetUtilizationScaler(target_utilization=0.5, scale_in_window_s=60.0)
    assert scaler.target(pool(time_s=0.0, in_flight=40)) == 8
    # load falls to a target of 2: the highest target of the last 60 s (8) holds
    assert scaler.target(pool(time_s=30.0, num_ready=8, in_flight=10)) == 8
    assert scaler.target(pool(time_s=59.0, num_ready=8, in_flight=10)) == 8
    assert scaler.target(pool(time_s=61.0, num_ready=8, in_flight=10)) == 2


# (case, pool changes, expected target) with QueueSLOScaler defaults but a 30 s calm spell
QUEUE_CASES = [
    ("calm but not for long: unchanged", {"in_flight": 5}, 4),
    ("queue drains within the bound: unchanged", {"queued": 8}, 4),
    ("queue would take 10 s (bound 5): double", {"queued": 20}, 8),
    ("queue would take 6 s: one more", {"queued": 12}, 5),
    ("SLO attainment below target: one more", {"slo_attainment": 0.8}, 5),
    ("nothing completes, requests wait: double", {"queued": 5, "completions_per_s": 0.0}, 8),
    ("help already starting: wait for it", {"queued": 40, "num_starting": 2}, 6),
]


@pytest.mark.parametrize(
    ("case", "changes", "expected"), QUEUE_CASES, ids=[c[0] for c in QUEUE_CASES]
)
def test_queue_slo(case: str, changes: dict, expected: int) -> None:
    scaler = QueueSLOScaler(scale_in_after_s=30.0, cooldown_s=0.0)
    assert scaler.target(pool(**changes)) == expected


def test_queue_slo_scales_in_after_a_calm_spell_and_a_cooldown() -> None:
    scaler = QueueSLOScaler(scale_in_utilization=0.4, scale_in_after_s=30.0, cooldown_s=60.0)
    calm = {"in_flight": 4}
    assert scaler.target(pool(time_s=0.0, **calm)) == 4
    assert scaler.target(pool(time_s=20.0, **calm)) == 4
    assert scaler.target(pool(time_s=30.0, **calm)) == 3  # calm for 30 s
    assert scaler.target(pool(time_s=40.0, num_ready=3, **calm)) == 3  # cooldown
    assert scaler.target(pool(time_s=90.0, num_ready=3, **calm)) == 2
    # a busy moment restarts the calm spell
    assert scaler.target(pool(time_s=100.0, num_ready=2, in_flight=15)) == 2
    assert scaler.target(pool(time_s=150.0, num_ready=2, in_flight=2)) == 2
    assert scaler.target(pool(time_s=181.0, num_ready=2, in_flight=2)) == 1


def test_predictive_provisions_for_the_forecast_a_horizon_ahead() -> None:
    scaler = PredictiveScaler(horizon_s=60.0, alpha=1.0, beta=1.0, target_utilization=1.0)
    # Little's law: an instance holds 10 requests for 5 s each: 2 req/s per instance, so 1
    # would do; but the 4 there at first are kept for the scale-in window
    assert scaler.target(pool(time_s=0.0, arrivals_per_s=2.0)) == 4
    # the rate grows 2 req/s per interval: forecast 6 intervals ahead = 4 + 6 x 2 = 16 req/s
    assert scaler.target(pool(time_s=10.0, arrivals_per_s=4.0)) == 8


def test_predictive_uses_a_given_instance_rate_and_drains_the_queue() -> None:
    scaler = PredictiveScaler(horizon_s=100.0, instance_rps=1.0, target_utilization=0.5)
    # 2 req/s now, flat, plus 100 queued over the 100 s horizon: 3 req/s at 0.5 req/s each
    assert scaler.target(pool(arrivals_per_s=2.0, queued=100)) == 6


def test_predictive_waits_until_it_can_size_an_instance() -> None:
    scaler = PredictiveScaler()
    assert scaler.target(pool(mean_latency_s=0.0)) == 4
    assert scaler.target(pool(num_ready=0, in_flight=0, queued=2, mean_latency_s=0.0)) == 1


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (TargetUtilizationScaler, {"target_utilization": 0.0}, "target_utilization"),
        (QueueSLOScaler, {"step": 0}, "step"),
        (QueueSLOScaler, {"target_slo_attainment": 1.5}, "target_slo_attainment"),
        (PredictiveScaler, {"alpha": 2.0}, "alpha"),
        (PredictiveScaler, {"instance_rps": -1.0}, "instance_rps"),
    ],
)
def test_bad_settings_name_the_value(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
