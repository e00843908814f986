"""The recovery policies, table-driven: back-off restarts (delay per crash history, giving
up, the window) and the link breaker (cut, probe, reopen, trusted paths)."""

from __future__ import annotations

import pytest

from policies.recovery import BackoffRestart, LinkBreaker, make_link_policy, make_restart_policy

BACKOFF = BackoffRestart(initial_delay_s=10.0, max_delay_s=60.0, max_restarts=4, window_s=600.0)


@pytest.mark.parametrize(
    ("crash_times", "now", "delay"),
    [
        ((100.0,), 100.0, 10.0),  # the first crash: the initial delay
        ((100.0, 200.0), 200.0, 20.0),  # doubled for each crash in the window
        ((100.0, 200.0, 300.0), 300.0, 40.0),
        ((100.0, 200.0, 300.0, 400.0), 400.0, 60.0),  # at most max_delay_s
        ((100.0, 200.0, 300.0, 400.0, 500.0), 500.0, None),  # the 5th in 10 min: given up
        ((0.0, 100.0, 200.0, 400.0, 900.0), 900.0, 20.0),  # only those within window_s count
        ((100.0, 2000.0), 2000.0, 10.0),  # up for longer than the window: from the start
        ((), 5.0, 10.0),  # a driver that keeps no history: the initial delay
    ],
)
def test_backoff_restart_delays(
    crash_times: tuple[float, ...], now: float, delay: float | None
) -> None:
    assert BACKOFF.restart_delay(crash_times, now) == delay


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_delay_s": -1.0}, "initial_delay_s=-1.0"),
        ({"initial_delay_s": 20.0, "max_delay_s": 10.0}, "max_delay_s=10.0"),
        ({"max_restarts": 0}, "max_restarts=0"),
        ({"max_restarts": 1.5}, "max_restarts=1.5"),
        ({"window_s": 0.0}, "window_s=0.0"),
    ],
)
def test_backoff_restart_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        BackoffRestart(**kwargs)  # type: ignore[arg-type]


# Each step: (event, time, expected) where event is "fail" / "ok" (a hand-off's result over
# p -> d), "handoff" (one starts over it; expected None) or "allows" / "trusted" (asked).
STEPS = {
    "one failure is not enough": [("fail", 0.0, None), ("allows", 0.1, True)],
    "two in a row cut the path": [
        ("fail", 0.0, None),
        ("fail", 0.1, None),
        ("allows", 0.2, False),
        ("trusted", 0.2, False),
    ],
    "a success between failures resets the count": [
        ("fail", 0.0, None),
        ("ok", 0.1, None),
        ("fail", 0.2, None),
        ("allows", 0.3, True),
    ],
    "after the cut, one probe": [
        ("fail", 0.0, None),
        ("fail", 0.0, None),
        ("allows", 4.9, False),
        ("allows", 5.0, True),
        ("handoff", 5.0, None),
        ("allows", 5.1, False),  # the probe is under way
        ("trusted", 5.1, False),  # a request that failed already is never the probe
    ],
    "a probe whose KV arrives closes the path": [
        ("fail", 0.0, None),
        ("fail", 0.0, None),
        ("handoff", 5.0, None),
        ("ok", 5.2, None),
        ("allows", 5.3, True),
        ("trusted", 5.3, True),
    ],
    "a failed probe cuts it for twice as long": [
        ("fail", 0.0, None),
        ("fail", 0.0, None),
        ("handoff", 5.0, None),
        ("fail", 5.2, None),
        ("allows", 15.1, False),
        ("allows", 15.2, True),
    ],
    "cuts grow to max_cut_s": [
        ("fail", 0.0, None),
        ("fail", 0.0, None),  # 5 s
        ("handoff", 5.0, None),
        ("fail", 5.0, None),  # 10 s
        ("handoff", 15.0, None),
        ("fail", 15.0, None),  # 20 s
        ("handoff", 35.0, None),
        ("fail", 35.0, None),  # 30 s (the cap), not 40
        ("allows", 64.9, False),
        ("allows", 65.0, True),
    ],
    "a probe never heard of frees the path for another after cut_s": [
        ("fail", 0.0, None),
        ("fail", 0.0, None),
        ("handoff", 5.0, None),
        ("allows", 9.9, False),
        ("allows", 10.0, True),
    ],
}


@pytest.mark.parametrize("name", list(STEPS))
def test_link_breaker(name: str) -> None:
    breaker = LinkBreaker(consecutive_failures=2, cut_s=5.0, max_cut_s=30.0)
    for event, now, expected in STEPS[name]:
        if event in ("fail", "ok"):
            breaker.on_result("p", "d", event == "ok", now)
        elif event == "handoff":
            breaker.on_handoff("p", "d", now)
        elif event == "allows":
            assert breaker.allows("p", "d", now) is expected, (event, now)
        else:
            assert breaker.trusted("p", "d") is expected, (event, now)
    assert breaker.allows("p", "other", 0.0)  # other paths are untouched


def test_cut_paths_lists_what_is_cut_and_for_how_long() -> None:
    breaker = LinkBreaker(consecutive_failures=1, cut_s=5.0)
    breaker.on_result("p", "d1", False, 1.0)
    assert breaker.cut_paths(2.0) == [("p", "d1", 4.0)]
    assert breaker.cut_paths(6.0) == []


def test_the_registries_build_the_policies_and_name_what_is_allowed() -> None:
    assert isinstance(make_restart_policy("backoff", initial_delay_s=1.0), BackoffRestart)
    assert isinstance(make_link_policy("link_breaker"), LinkBreaker)
    with pytest.raises(ValueError, match=r"'never'.*backoff"):
        make_restart_policy("never")
