"""Quotas (policies/quotas.py): per-user and per-tenant limits, on hand-made requests, in the
core, and in a simulation where one user floods the cluster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cpsim.limits import Limit
from cpsim.protocols import AdmissionPolicy
from cpsim.views import RequestView
from policies.quotas import Quotas

Make = Callable[..., RequestView]

# (case, Quotas kwargs, requests as (id, user, arrival_s, prompt, max_tokens),
#  expected admit() result per request: None or a substring of the reason)
REJECT_CASES = [
    (
        "requests_per_s with a burst of 2",
        {"per_user": {"requests_per_s": 1.0, "burst_s": 2.0}},
        [("r1", "a", 0.0, 10, 10), ("r2", "a", 0.0, 10, 10), ("r3", "a", 0.0, 10, 10)],
        [None, None, "user 'a' is over requests_per_s=1.0"],
    ),
    (
        "the bucket refills",
        {"per_user": {"requests_per_s": 1.0}},
        [("r1", "a", 0.0, 10, 10), ("r2", "a", 0.5, 10, 10), ("r3", "a", 1.0, 10, 10)],
        [None, "over requests_per_s=1.0", None],
    ),
    (
        "users have their own buckets",
        {"per_user": {"requests_per_s": 1.0}},
        [("r1", "a", 0.0, 10, 10), ("r2", "b", 0.0, 10, 10)],
        [None, None],
    ),
    (
        "tokens_per_min counts prompt and max_tokens",
        {"per_user": {"tokens_per_min": 1000}},
        [("r1", "a", 0.0, 400, 400), ("r2", "a", 0.0, 100, 100), ("r3", "a", 0.0, 100, 10)],
        [None, None, "user 'a' is over tokens_per_min=1000"],
    ),
    (
        "more tokens than a minute allows: never",
        {"per_user": {"tokens_per_min": 1000}},
        [("r1", "a", 0.0, 900, 200)],
        ["may use 1100 tokens (prompt and max_tokens), more than tokens_per_min=1000 of user 'a'"],
    ),
    (
        "concurrency counts queued and running requests",
        {"per_user": {"max_concurrent": 2}},
        [("r1", "a", 0.0, 10, 10), ("r2", "a", 0.0, 10, 10), ("r3", "a", 9.0, 10, 10)],
        [None, None, "user 'a' has 2 active, max_concurrent=2"],
    ),
    (
        "a tenant's users share its limit",
        {"per_tenant": {"requests_per_s": 1.0}, "tenants": {"acme": ["a", "b"]}},
        [("r1", "a", 0.0, 10, 10), ("r2", "b", 0.0, 10, 10), ("r3", "c", 0.0, 10, 10)],
        [None, "tenant 'acme' is over requests_per_s=1.0", None],
    ),
    (
        "a named tenant's own limit replaces per_tenant",
        {
            "per_tenant": {"requests_per_s": 1.0},
            "tenants": {"acme": ["a"], "free": ["b"]},
            "tenant_limits": {"acme": {"requests_per_s": 5.0}},
        },
        [("r1", "a", 0.0, 10, 10), ("r2", "a", 0.0, 10, 10), ("r3", "b", 0.0, 10, 10),
         ("r4", "b", 0.0, 10, 10)],
        [None, None, None, "tenant 'free' is over requests_per_s=1.0"],
    ),
    (
        "a named user's own limit replaces per_user",
        {"per_user": {"max_concurrent": 1}, "user_limits": {"vip": {"max_concurrent": 3}}},
        [("r1", "vip", 0.0, 10, 10), ("r2", "vip", 0.0, 10, 10), ("r3", "a", 0.0, 10, 10),
         ("r4", "a", 0.0, 10, 10)],
        [None, None, None, "user 'a' has 1 active, max_concurrent=1"],
    ),
    (
        "no limits: everything in",
        {},
        [("r1", "a", 0.0, 10**6, 10**6)],
        [None],
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "requests", "expected"), REJECT_CASES, ids=[c[0] for c in REJECT_CASES]
)
def test_reject_mode_admits_or_names_the_limit(
    case: str, kwargs: dict[str, Any], requests: list[tuple], expected: list, make_request: Make
) -> None:
    quotas = Quotas(over_limit="reject", **kwargs)
    for (rid, user, at, prompt, out), want in zip(requests, expected, strict=True):
        view = make_request(rid, user_id=user, arrival_s=at, num_prompt_tokens=prompt,
                            max_tokens=out)
        got = quotas.admit(view, at)
        if want is None:
            assert got is None, (rid, got)
            assert quotas.hold(view, at) is None  # reject mode decides at arrival only
        else:
            assert got is not None and got.startswith("rejected by quota: ") and want in got


def test_reject_mode_frees_a_slot_when_a_request_ends(make_request: Make) -> None:
    quotas = Quotas(over_limit="reject", per_user=Limit(max_concurrent=1))
    first, second = make_request("r1", user_id="a"), make_request("r2", user_id="a")
    assert quotas.admit(first, 0.0) is None
    assert quotas.admit(second, 0.0) is not None
    quotas.on_end("r2")  # a rejected request holds nothing
    assert quotas.admit(make_request("r3", user_id="a"), 0.0) is not None
    quotas.on_end("r1")
    assert quotas.admit(make_request("r4", user_id="a"), 0.0) is None


def test_hold_mode_queues_everything_and_releases_at_the_rate(make_request: Make) -> None:
    quotas = Quotas(per_user=Limit(requests_per_s=2.0))  # holds, a burst of 2
    views = [make_request(f"r{i}", user_id="a") for i in range(4)]
    assert all(quotas.admit(v, 0.0) is None for v in views)
    released = []
    for v in views:  # one pass at t=0: two go, the rest wait behind the first held
        if quotas.hold(v, 0.0) is None:
            quotas.on_dispatch(v, 0.0)
            released.append(v.request_id)
    assert released == ["r0", "r1"]
    assert quotas.hold(views[2], 0.0) == "user 'a' is over requests_per_s=2.0"
    assert quotas.next_release_s() == pytest.approx(0.5)
    assert quotas.hold(views[2], 0.5) is None


def test_hold_mode_keeps_a_users_order(make_request: Make) -> None:
    """A small request behind a held big one waits too (a stream of small ones cannot
    starve a big one)."""
    quotas = Quotas(per_user=Limit(tokens_per_min=1000))
    big = make_request("big", user_id="a", num_prompt_tokens=500, max_tokens=400)
    small = make_request("small", user_id="a", num_prompt_tokens=10, max_tokens=10)
    quotas.on_dispatch(make_request("r0", user_id="a", num_prompt_tokens=300, max_tokens=300),
                       0.0)
    assert quotas.hold(big, 1.0) is not None
    assert quotas.hold(small, 1.0) is not None  # it would fit, but it is behind ``big``
    other = make_request("other", user_id="b")
    assert quotas.hold(other, 1.0) is None


def test_hold_mode_charges_a_retried_request_once(make_request: Make) -> None:
    quotas = Quotas(per_user=Limit(max_concurrent=1))
    r1 = make_request("r1", user_id="a")
    quotas.on_dispatch(r1, 0.0)
    quotas.on_dispatch(r1, 1.0)  # dispatched again after its instance failed
    assert quotas.hold(r1, 1.0) is None  # already holds its slot
    quotas.on_end("r1")
    assert quotas.hold(make_request("r2", user_id="a"), 2.0) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"over_limit": "drop"}, "over_limit='drop' is not one of: hold, reject"),
        ({"tenants": {"t": "alice"}}, "tenants['t']='alice' must be a list of user ids"),
        ({"tenants": {"t": ["a"], "u": ["a"]}}, "user 'a' is in tenants 't' and 'u'"),
        ({"tenant_limits": {"x": {}}}, "tenant_limits name tenants ['x'] that are not in"),
        ({"per_user": {"requests_per_s": -1}}, "requests_per_s"),
    ],
)
def test_bad_quotas_name_the_value(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Quotas(**kwargs)


def test_quotas_are_an_admission_policy() -> None:
    assert isinstance(Quotas(), AdmissionPolicy)


# ---------------------------------------------------------------- in a simulation
def test_a_held_user_is_released_at_its_rate_and_nothing_is_lost(flood: Any) -> None:
    records, sent = flood("quotas=per_user")  # 2 req/s per user, burst 2 s, 8 at once
    assert sorted(records.request_id) == sorted(m.request_id for _, m in sent)
    assert (records.status == "COMPLETED").all()
    heavy = np.sort(records[records.user_id == "heavy"].dispatch_time_s.to_numpy())
    # a token bucket of 2/s holding 4: at most 4 + 2 x W dispatches in any W seconds
    for window in (1.0, 10.0, 100.0):
        ends = np.searchsorted(heavy, heavy + window, side="left")
        assert (ends - np.arange(len(heavy))).max() <= 4 + 2 * window + 1e-9
    light = records[records.user_id == "light"]
    assert light.queue_delay_ms.median() < 5000  # held only by its own (unused) quota


def test_reject_mode_rejects_with_the_reason(flood: Any) -> None:
    records, sent = flood("quotas=per_user", "quotas.over_limit=reject")
    assert len(records) == len(sent)  # every request has its one record
    rejected = records[records.status == "REJECTED"]
    for user, reason in zip(rejected.user_id, rejected.reason, strict=True):
        assert reason.startswith(f"rejected by quota: user '{user}' "), reason  # its own limit
    # the flood is refused; the light user only where its own 8 requests (8 s each) are active
    by_user = rejected.user_id.value_counts()
    assert by_user["heavy"] > 2000 and by_user.get("light", 0) < 20
    assert (records[records.status != "REJECTED"].status == "COMPLETED").all()
