"""PD policies: when a prompt is split, how the adaptive threshold moves, and end-to-end runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cpsim.types import ExecutionInstance, ExecutionInstanceType, PDSeparationConfig
from policies import PD_POLICIES, make_pd_policy, make_policy, make_router
from policies.pd.adaptive import AdaptivePDPolicy, ThresholdMove
from policies.pd.threshold import ThresholdPDPolicy

# conf/pd/off.yaml names "no PD" for sweeps: no policy behind it
PD_YAMLS = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "conf" / "pd").glob("*.yaml")
    if p.stem != "off"
)
PREFILL = ExecutionInstanceType.PREFILLING
DECODE = ExecutionInstanceType.DECODING
GENERAL = ExecutionInstanceType.GENERAL

Factory = Callable[..., Any]


def pools(
    make_instance: Factory, prefill_in_flight: int = 0, decode_in_flight: int = 0
) -> list[Any]:
    """One prefill and one decode instance of capacity 10, plus a general one."""
    return [
        make_instance("p", instance_type=PREFILL, in_flight=prefill_in_flight),
        make_instance("d", instance_type=DECODE, in_flight=decode_in_flight),
        make_instance("g", instance_type=GENERAL, in_flight=9),
    ]


# ---------------------------------------------------------------- registry and configs


@pytest.mark.parametrize("path", PD_YAMLS, ids=lambda p: p.stem)
def test_yaml_builds_the_registered_pd_policy(path: Path, from_yaml: Callable[..., Any]) -> None:
    policy, cls, _ = from_yaml(path)
    assert PD_POLICIES[path.stem] is cls
    assert policy.name == path.stem


def test_every_pd_policy_has_a_yaml() -> None:
    assert {p.stem for p in PD_YAMLS} == set(PD_POLICIES)


def test_unknown_pd_policy_lists_the_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"unknown PD policy 'never'.*threshold"):
        make_pd_policy("never")


# ---------------------------------------------------------------- threshold

# (prompt tokens, max_tokens, instances as (type, healthy), expected)
THRESHOLD_CASES = [
    ("long prompt, both pools", 1000, 16, [(PREFILL, True), (DECODE, True)], True),
    ("at the threshold", 800, 16, [(PREFILL, True), (DECODE, True)], True),
    ("just below", 799, 16, [(PREFILL, True), (DECODE, True)], False),
    ("one output token: nothing to hand off", 1000, 1, [(PREFILL, True), (DECODE, True)], False),
    ("prefill pool down", 1000, 16, [(PREFILL, False), (DECODE, True)], False),
    ("no decode pool", 1000, 16, [(PREFILL, True), (GENERAL, True)], False),
    ("general only", 1000, 16, [(GENERAL, True)], False),
    (
        "one healthy of each is enough",
        1000,
        16,
        [(PREFILL, False), (PREFILL, True), (DECODE, False), (DECODE, True)],
        True,
    ),
]


@pytest.mark.parametrize(
    ("case", "prompt_tokens", "max_tokens", "layout", "expected"),
    THRESHOLD_CASES,
    ids=[c[0] for c in THRESHOLD_CASES],
)
@pytest.mark.parametrize("cls", [ThresholdPDPolicy, AdaptivePDPolicy])
def test_threshold_decision(
    cls: type,
    case: str,
    prompt_tokens: int,
    max_tokens: int,
    layout: list[tuple[ExecutionInstanceType, bool]],
    expected: bool,
    make_request: Factory,
    make_instance: Factory,
) -> None:
    instances = [
        make_instance(f"i{k}", instance_type=kind, is_healthy=healthy)
        for k, (kind, healthy) in enumerate(layout)
    ]
    request = make_request(num_prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    assert cls(threshold_tokens=800).disaggregate(request, instances, 0.0) is expected


def test_threshold_from_config() -> None:
    config = PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=300)
    assert ThresholdPDPolicy.from_config(config).threshold_tokens == 300


def test_threshold_validates() -> None:
    with pytest.raises(ValueError, match="threshold_tokens=-1"):
        ThresholdPDPolicy(threshold_tokens=-1)


# ---------------------------------------------------------------- adaptive

# (prefill in flight, decode in flight, expected threshold after one decision); capacity 10
ADAPTIVE_MOVES = [
    ("prefill busier: fewer splits", 8, 2, 864),
    ("decode busier: more splits", 1, 7, 736),
    ("difference below hysteresis", 5, 4, 800),
    ("difference at hysteresis moves", 5, 3, 864),
    ("balanced", 6, 6, 800),
]


@pytest.mark.parametrize(
    ("case", "prefill", "decode", "expected"), ADAPTIVE_MOVES, ids=[c[0] for c in ADAPTIVE_MOVES]
)
def test_adaptive_moves_toward_balance(
    case: str,
    prefill: int,
    decode: int,
    expected: int,
    make_request: Factory,
    make_instance: Factory,
) -> None:
    policy = AdaptivePDPolicy(threshold_tokens=800, step_tokens=64, hysteresis=0.2)
    policy.disaggregate(make_request(), pools(make_instance, prefill, decode), 5.0)
    assert policy.threshold_tokens == expected
    if expected == 800:
        assert policy.history == []
    else:
        load_p, load_d = prefill / 10, decode / 10
        assert policy.history == [ThresholdMove(5.0, 800, expected, load_p, load_d)]


def test_adaptive_threshold_decides_the_split(
    make_request: Factory, make_instance: Factory
) -> None:
    policy = AdaptivePDPolicy(threshold_tokens=800, step_tokens=64, hysteresis=0.2)
    request = make_request(num_prompt_tokens=850)
    assert policy.disaggregate(request, pools(make_instance), 0.0)
    assert not policy.disaggregate(request, pools(make_instance, 9, 0), 1.0)  # moved to 864


def test_adaptive_clamps_and_rate_limits(make_request: Factory, make_instance: Factory) -> None:
    policy = AdaptivePDPolicy(
        threshold_tokens=800,
        min_threshold_tokens=700,
        max_threshold_tokens=900,
        step_tokens=64,
        min_interval_s=1.0,
    )
    busy_prefill = pools(make_instance, 9, 0)
    for step in range(10):
        for _ in range(5):  # one dispatch round asks once per queued request
            policy.disaggregate(make_request(), busy_prefill, float(step))
    assert policy.threshold_tokens == 900
    assert [m.to_tokens for m in policy.history] == [864, 900]
    assert [m.time_s for m in policy.history] == [0.0, 1.0]
    busy_decode = pools(make_instance, 0, 9)
    for step in range(10, 20):
        policy.disaggregate(make_request(), busy_decode, float(step))
    assert policy.threshold_tokens == 700


def test_adaptive_does_not_flap_inside_hysteresis(
    make_request: Factory, make_instance: Factory
) -> None:
    policy = AdaptivePDPolicy(hysteresis=0.2, min_interval_s=0.0)
    for step in range(100):
        prefill, decode = (6, 5) if step % 2 else (5, 6)  # differences of 0.1
        policy.disaggregate(make_request(), pools(make_instance, prefill, decode), float(step))
    assert policy.history == [] and policy.threshold_tokens == 800


def test_adaptive_waits_for_both_pools(make_request: Factory, make_instance: Factory) -> None:
    policy = AdaptivePDPolicy(min_interval_s=0.0)
    only_prefill = [make_instance("p", instance_type=PREFILL, in_flight=9)]
    assert not policy.disaggregate(make_request(num_prompt_tokens=5000), only_prefill, 0.0)
    assert policy.history == []


def test_adaptive_from_config() -> None:
    config = PDSeparationConfig(
        enabled=True,
        routing_policy="adaptive",
        prefilling_threshold_input_tokens=1000,
        min_threshold_input_tokens=256,
        max_threshold_input_tokens=4096,
        adaptive_step_tokens=128,
        adaptive_hysteresis=0.1,
    )
    policy = AdaptivePDPolicy.from_config(config)
    assert (
        policy.threshold_tokens,
        policy.min_threshold_tokens,
        policy.max_threshold_tokens,
        policy.step_tokens,
        policy.hysteresis,
    ) == (1000, 256, 4096, 128, 0.1)
    clamped = PDSeparationConfig(
        prefilling_threshold_input_tokens=50, min_threshold_input_tokens=128
    )
    assert AdaptivePDPolicy.from_config(clamped).threshold_tokens == 128


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold_tokens": 100}, "threshold_tokens"),  # below min 128
        ({"min_threshold_tokens": 900, "max_threshold_tokens": 800}, "max_threshold_tokens"),
        ({"step_tokens": 0}, "step_tokens"),
        ({"hysteresis": 1.5}, "hysteresis"),
        ({"min_interval_s": -1.0}, "min_interval_s"),
    ],
)
def test_adaptive_validates(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdaptivePDPolicy(**kwargs)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("pd_name", sorted(PD_POLICIES))
@pytest.mark.parametrize("router_name", ["round_robin", "load_balanced", "prefix_cache_aware"])
def test_control_plane_splits_long_prompts(pd_name: str, router_name: str, drive: Factory) -> None:
    cluster = [
        ExecutionInstance("p", instance_type="prefilling", max_concurrent_requests=2),
        ExecutionInstance("d", instance_type="decoding", max_concurrent_requests=4),
        ExecutionInstance("g", max_concurrent_requests=2),
    ]
    kwargs = {"threshold_tokens": 80} | (
        {"min_threshold_tokens": 0} if pd_name == "adaptive" else {}
    )
    pd_policy = make_pd_policy(pd_name, **kwargs)  # prompts are 40 to 128 tokens
    records = drive(make_policy("fifo"), make_router(router_name), pd_policy, cluster)
    assert set(records["status"].astype(str)) == {"COMPLETED"}
    split = records[records["prefill_instance_id"].astype(str) == "p"]
    assert len(split) > 0
    assert split["decode_instance_id"].astype(str).isin(["d", "g"]).all()  # never the prefill one
    if pd_name == "threshold":  # (a long prompt may still run whole when "p" is full)
        assert (split["num_prompt_tokens"] >= 80).all()
