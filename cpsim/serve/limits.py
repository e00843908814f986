"""Rate limits and concurrency quotas per API key and per user: token buckets.

A request is charged one request and its token estimate (prompt estimate + ``max_tokens``)
when it is admitted; over a limit it is refused with how long to wait (``Retry-After``).
Concurrency quotas count requests in flight until each ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from cpsim.limits import Limit, TokenBucket

__all__ = ["Limit", "Limiter", "Refused", "TokenBucket"]


class Refused(Exception):
    """Over a limit: ``limit`` names it, ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class _Principal:
    def __init__(self, limit: Limit, now: float) -> None:
        self.requests = limit.request_bucket(now)
        self.tokens = limit.token_bucket(now)
        self.in_flight = 0


class Limiter:
    """Per-key and per-user limits. ``admit`` checks every limit before charging any, so a
    refused request costs nothing; ``release`` ends an admitted request."""

    def __init__(
        self,
        per_key: Limit | None = None,
        per_user: Limit | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {"key": per_key or Limit(), "user": per_user or Limit()}
        self.clock = clock
        self._principals: dict[tuple[str, str], _Principal] = {}

    def _principal(self, kind: str, name: str, now: float) -> _Principal:
        found = self._principals.get((kind, name))
        if found is None:
            found = self._principals[(kind, name)] = _Principal(self.limits[kind], now)
        return found

    def admit(self, key: str | None, user: str, tokens: int) -> list[tuple[str, str]]:
        """Admit a request of about ``tokens`` tokens or raise Refused (over a rate: the
        wait until it fits; over a token budget it could never fit: ValueError). Returns
        what to pass to ``release``."""
        now = self.clock()
        who = [("user", user)] if self.limits["user"].is_set else []
        if key is not None and self.limits["key"].is_set:
            who.insert(0, ("key", key))
        principals = [(kind, name, self._principal(kind, name, now)) for kind, name in who]
        for kind, name, p in principals:
            limit = self.limits[kind]
            label = f"{kind} {name!r}" if kind == "user" else "API key"
            if limit.max_concurrent is not None and p.in_flight >= limit.max_concurrent:
                raise Refused(
                    f"{label} has {p.in_flight} requests in flight, "
                    f"max_concurrent={limit.max_concurrent}",
                    f"{kind}_concurrency",
                    1.0,
                )
            if p.requests is not None:
                wait = p.requests.wait_s(1.0, now)
                if wait > 0:
                    raise Refused(
                        f"{label} is over requests_per_s={limit.requests_per_s}",
                        f"{kind}_requests_per_s",
                        wait,
                    )
            if p.tokens is not None:
                if tokens > p.tokens.capacity:
                    raise ValueError(
                        f"the request may use {tokens} tokens (prompt and max_tokens), more "
                        f"than {label}'s tokens_per_min={limit.tokens_per_min} allows at all"
                    )
                wait = p.tokens.wait_s(tokens, now)
                if wait > 0:
                    raise Refused(
                        f"{label} is over tokens_per_min={limit.tokens_per_min}",
                        f"{kind}_tokens_per_min",
                        wait,
                    )
        for _kind, _name, p in principals:
            if p.requests is not None:
                p.requests.take(1.0)
            if p.tokens is not None:
                p.tokens.take(tokens)
            p.in_flight += 1
        return who

    def release(self, admitted: list[tuple[str, str]]) -> None:
        for kind, name in admitted:
            p = self._principals.get((kind, name))
            if p is not None:
                p.in_flight -= 1
