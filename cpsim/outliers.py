"""Outlier ejection: an instance that keeps failing requests is taken out of routing.

An engine that answers every request with an error at once looks idle to a load-aware
router (it finishes its work instantly), so without this it would capture the traffic. As
Envoy's outlier detection does, the control plane watches each instance's outcomes and
ejects one after ``consecutive_failures`` failures in a row, or when more than
``failure_rate`` of its last ``window`` outcomes (at least ``min_requests``, none older
than ``window_s``) failed. An
ejection lasts ``base_ejection_s`` times 2^(ejections in a row - 1), at most
``max_ejection_s``; then the instance is on probation: it takes at most
``probe_concurrency`` requests at a time until ``probe_successes`` of them succeed (trusted
again, the back-off resets) or one fails (ejected again, for twice as long).

Only failures the backend blames on the instance count (an engine error, a timeout, a
connection refused), not a request's own fault (a prompt longer than the model takes). The
same outcomes give the error rate routers count as load; as they age out of ``window_s`` an
instance that failed once is tried again (a load-aware router stops sending it requests
after its first failures, so without ageing it would never be tried again). At
most ``max_ejected_frac`` of the registered instances are ejected at once (one, at least,
when there are two or more); and when every instance that could serve a request is
ejected, the request goes to them anyway rather than wait (Envoy's panic routing).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cpsim.validation import check_positive, check_range


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """When an instance is ejected from routing, for how long, and how it comes back.
    ``enabled=False`` turns ejection off (the error rate still counts as load)."""

    enabled: bool = True
    consecutive_failures: int = 5
    failure_rate: float = 0.5
    window: int = 20
    window_s: float = 10.0
    min_requests: int = 10
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejected_frac: float = 0.5
    probe_concurrency: int = 1
    probe_successes: int = 3

    def __post_init__(self) -> None:
        check_positive("consecutive_failures", self.consecutive_failures, integer=True)
        check_range("failure_rate", self.failure_rate, 0.0, 1.0)
        check_positive("window", self.window, integer=True)
        check_positive("window_s", self.window_s)
        check_positive("min_requests", self.min_requests, integer=True)
        if self.min_requests > self.window:
            raise ValueError(
                f"min_requests={self.min_requests!r} is not allowed; it must be at most "
                f"window={self.window!r}"
            )
        check_positive("base_ejection_s", self.base_ejection_s)
        check_positive("max_ejection_s", self.max_ejection_s)
        check_range("max_ejected_frac", self.max_ejected_frac, 0.0, 1.0)
        check_positive("probe_concurrency", self.probe_concurrency, integer=True)
        check_positive("probe_successes", self.probe_successes, integer=True)

    def ejection_s(self, ejections_in_a_row: int) -> float:
        """How long the ``ejections_in_a_row``-th ejection in a row lasts."""
        return min(self.max_ejection_s, self.base_ejection_s * 2.0 ** (ejections_in_a_row - 1))

    def max_ejected(self, num_instances: int) -> int:
        """How many of ``num_instances`` may be ejected at once."""
        if num_instances < 2:
            return 0
        return max(1, int(self.max_ejected_frac * num_instances))


class OutlierState:
    """One instance's recent outcomes and where it stands: trusted, ejected (until
    ``ejected_until_s``, because of ``reason``) or on probation.

    The control plane records a success only while a failure is on record (or the instance
    is on probation): on a clean instance a success would change nothing but the window's
    length, and it is every request's last event. So the window starts at the first
    failure: one failure alone is an error rate of 1 until the outcomes after it dilute it
    (on a busy instance, its requests in flight, within moments)."""

    __slots__ = (
        "consecutive_failures",
        "ejected_until_s",
        "ejections_in_a_row",
        "num_ejections",
        "num_failed",
        "outcomes",
        "probe_successes",
        "probing",
        "reason",
    )

    def __init__(self, window: int) -> None:
        self.outcomes: deque[tuple[float, bool]] = deque(maxlen=window)  # (when, failed)
        self.num_failed = 0  # of ``outcomes``
        self.consecutive_failures = 0
        self.ejected_until_s: float | None = None
        self.ejections_in_a_row = 0
        self.num_ejections = 0
        self.probing = False
        self.probe_successes = 0
        self.reason = ""

    @property
    def error_rate(self) -> float:
        """Failed fraction of the recent outcomes (0 before any)."""
        n = len(self.outcomes)
        return self.num_failed / n if n else 0.0

    def is_ejected(self) -> bool:
        return self.ejected_until_s is not None

    def age(self, now: float, window_s: float) -> bool:
        """Forget outcomes older than ``window_s``; True if any was forgotten."""
        outcomes = self.outcomes
        aged = False
        while outcomes and outcomes[0][0] < now - window_s:
            _, failed = outcomes.popleft()
            if failed:
                self.num_failed -= 1
            aged = True
        return aged

    def record(self, failed: bool, now: float, config: OutlierConfig) -> str | None:
        """Count one outcome; returns why the instance should now be ejected, or None."""
        outcomes = self.outcomes
        if outcomes and outcomes[0][0] < now - config.window_s:
            self.age(now, config.window_s)
        if len(outcomes) == outcomes.maxlen and outcomes[0][1]:
            self.num_failed -= 1  # the oldest outcome, a failure, drops out of the window
        outcomes.append((now, failed))
        if not failed:
            self.consecutive_failures = 0
            if self.probing:
                self.probe_successes += 1
                if self.probe_successes >= config.probe_successes:
                    self.probing = False
                    self.ejections_in_a_row = 0
            return None
        self.num_failed += 1
        self.consecutive_failures += 1
        if self.is_ejected():
            return None
        if self.probing:
            return "failed a probe request after an ejection"
        if self.consecutive_failures >= config.consecutive_failures:
            return f"{self.consecutive_failures} consecutive failures"
        n = len(self.outcomes)
        if n >= config.min_requests and self.error_rate > config.failure_rate:
            return (
                f"{self.num_failed} of its last {n} requests failed "
                f"(more than failure_rate={config.failure_rate})"
            )
        return None

    def eject(self, now: float, reason: str, config: OutlierConfig) -> None:
        self.ejections_in_a_row += 1
        self.num_ejections += 1
        self.ejected_until_s = now + config.ejection_s(self.ejections_in_a_row)
        self.reason = reason
        self.probing = False

    def start_probation(self) -> None:
        """The ejection is over: take a trickle of requests before being trusted again."""
        self.ejected_until_s = None
        self.probing = True
        self.probe_successes = 0
        self.consecutive_failures = 0
        self.outcomes.clear()
        self.num_failed = 0

    def describe(self, now: float) -> dict[str, object]:
        """For ``get_instance_metrics`` and ``get_status``; times on the driver's clock."""
        until = self.ejected_until_s
        return {
            "ejected": until is not None,
            "ejected_until_s": until,
            "ejected_for_s": None if until is None else max(0.0, until - now),
            "ejection_reason": self.reason if self.is_ejected() else "",
            "on_probation": self.probing,
            "num_ejections": self.num_ejections,
            "consecutive_failures": self.consecutive_failures,
            "error_rate": self.error_rate,
        }
