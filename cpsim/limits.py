"""Limits of one principal (a user, a tenant, an API key) and the token bucket that meters
them: shared by the gateway's admission (cpsim/serve/limits.py) and the control plane's
quotas (policies/quotas.py), so a limit means the same in simulation and live."""

from __future__ import annotations

from dataclasses import dataclass

from cpsim.validation import check_positive


@dataclass(frozen=True)
class Limit:
    """Limits of one principal (a key, a user); None: no limit. ``burst_s``: how many
    seconds of the rate a bucket holds when full."""

    requests_per_s: float | None = None
    tokens_per_min: float | None = None
    max_concurrent: int | None = None
    burst_s: float = 1.0

    def __post_init__(self) -> None:
        if self.requests_per_s is not None:
            check_positive("requests_per_s", self.requests_per_s)
        if self.tokens_per_min is not None:
            check_positive("tokens_per_min", self.tokens_per_min)
        if self.max_concurrent is not None:
            check_positive("max_concurrent", self.max_concurrent, integer=True)
        check_positive("burst_s", self.burst_s)

    def request_bucket(self, now: float) -> TokenBucket | None:
        """The bucket of ``requests_per_s`` (holding ``burst_s`` of them, at least one)."""
        if self.requests_per_s is None:
            return None
        return TokenBucket(self.requests_per_s, max(1.0, self.requests_per_s * self.burst_s), now)

    def token_bucket(self, now: float) -> TokenBucket | None:
        """The bucket of ``tokens_per_min`` (holding a minute of them)."""
        if self.tokens_per_min is None:
            return None
        return TokenBucket(self.tokens_per_min / 60.0, self.tokens_per_min, now)

    @property
    def is_set(self) -> bool:
        return not (
            self.requests_per_s is None
            and self.tokens_per_min is None
            and self.max_concurrent is None
        )


class TokenBucket:
    """``rate`` units a second, holding at most ``capacity``; full at the start."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0: now)."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount
