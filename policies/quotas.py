"""Quotas: per-user and per-tenant rate limits and concurrency caps on the control plane.

Each request is charged to its user and to its user's tenant (``tenants``: tenant -> its
users; a user in no tenant is charged as a user only): one request, and its tokens (prompt
+ ``max_tokens``, what it may use) against ``requests_per_s`` and ``tokens_per_min`` token
buckets, and one slot of ``max_concurrent`` while it is active. The same ``Limit`` as the
gateway's (cpsim/limits.py), so a quota means the same in simulation and live.

``over_limit`` says what happens to a request over a limit:

- ``"hold"`` (default): it is queued but not dispatched until its buckets have room and a
  slot is free; it is charged when dispatched. The user's later requests wait behind it (a
  stream of small ones cannot starve a big one). A held request that outwaits the core's
  ``queue_timeout_s`` fails, with the quota that held it in its reason.
- ``"reject"``: it is REJECTED on arrival, the reason naming the limit; charged on
  arrival, a slot is held from arrival (queued or running) to its end.

A request whose tokens exceed a whole minute of ``tokens_per_min`` could never be admitted:
it is rejected in either mode. Nothing is dropped without a reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cpsim.limits import Limit, TokenBucket
from cpsim.validation import check_choice
from cpsim.views import RequestView

OVER_LIMIT = ("hold", "reject")


def _limit(value: Limit | Mapping[str, Any] | None) -> Limit:
    if value is None:
        return Limit()
    if isinstance(value, Limit):
        return value
    return Limit(**dict(value))


class _Principal:
    """One user's or tenant's buckets and active count."""

    def __init__(self, kind: str, name: str, limit: Limit, now: float) -> None:
        self.label = f"{kind} {name!r}"
        self.limit = limit
        self.requests: TokenBucket | None = limit.request_bucket(now)
        self.tokens: TokenBucket | None = limit.token_bucket(now)
        self.active = 0

    def over(self, tokens: float, now: float) -> tuple[str, float] | None:
        """Why a request of ``tokens`` cannot be charged now and how long until it could
        (inf: not before a slot frees); None when it can."""
        limit = self.limit
        if limit.max_concurrent is not None and self.active >= limit.max_concurrent:
            why = f"{self.label} has {self.active} active, max_concurrent={limit.max_concurrent}"
            return why, float("inf")
        if self.requests is not None:
            wait = self.requests.wait_s(1.0, now)
            if wait > 0:
                return f"{self.label} is over requests_per_s={limit.requests_per_s}", wait
        if self.tokens is not None:
            wait = self.tokens.wait_s(tokens, now)
            if wait > 0:
                return f"{self.label} is over tokens_per_min={limit.tokens_per_min}", wait
        return None

    def charge(self, tokens: float) -> None:
        if self.requests is not None:
            self.requests.take(1.0)
        if self.tokens is not None:
            self.tokens.take(tokens)
        self.active += 1


class Quotas:
    """Per-user and per-tenant limits (see the module docstring). ``per_user`` /
    ``per_tenant``: every user's / tenant's limit; ``user_limits`` / ``tenant_limits``:
    named ones that replace it (a paying tenant's larger quota)."""

    name = "quotas"

    def __init__(
        self,
        per_user: Limit | Mapping[str, Any] | None = None,
        per_tenant: Limit | Mapping[str, Any] | None = None,
        tenants: Mapping[str, Sequence[str]] | None = None,
        user_limits: Mapping[str, Limit | Mapping[str, Any]] | None = None,
        tenant_limits: Mapping[str, Limit | Mapping[str, Any]] | None = None,
        over_limit: str = "hold",
    ) -> None:
        check_choice("over_limit", over_limit, OVER_LIMIT)
        self.over_limit = over_limit
        self.per_user = _limit(per_user)
        self.per_tenant = _limit(per_tenant)
        self.user_limits = {str(k): _limit(v) for k, v in (user_limits or {}).items()}
        self.tenant_limits = {str(k): _limit(v) for k, v in (tenant_limits or {}).items()}
        self.tenant_of: dict[str, str] = {}
        for tenant, users in (tenants or {}).items():
            if isinstance(users, str):
                raise ValueError(
                    f"tenants[{tenant!r}]={users!r} must be a list of user ids, not a string"
                )
            for user in users:
                other = self.tenant_of.setdefault(str(user), str(tenant))
                if other != tenant:
                    raise ValueError(
                        f"user {user!r} is in tenants {other!r} and {tenant!r}; "
                        "a user belongs to one tenant"
                    )
        unknown = sorted(set(self.tenant_limits) - set(tenants or {}))
        if unknown:
            raise ValueError(
                f"tenant_limits name tenants {unknown} that are not in tenants "
                f"{sorted(tenants or {})}"
            )
        self._principals: dict[tuple[str, str], _Principal] = {}
        self._of_user: dict[str, list[_Principal]] = {}  # each user's, built once
        self._charged: dict[str, list[_Principal]] = {}  # request id -> charged principals
        # a pass over the queue (one ``now``): principals found over a limit hold the rest
        # of their requests in that pass; the earliest time one could go
        self._pass_s = float("nan")
        self._blocked: dict[int, str] = {}
        self._next_release_s: float | None = None

    # ------------------------------------------------------------------ the core's calls
    def admit(self, request: RequestView, now: float) -> str | None:
        """On arrival: None to queue the request, else the reason it is rejected."""
        tokens = float(request.num_prompt_tokens + request.max_tokens)
        principals = self._principals_of(request.user_id, now)
        for p in principals:
            if p.tokens is not None and tokens > p.tokens.capacity:
                return (
                    f"rejected by quota: the request may use {int(tokens)} tokens (prompt and "
                    f"max_tokens), more than tokens_per_min={p.limit.tokens_per_min} of "
                    f"{p.label} allows at all"
                )
        if self.over_limit == "hold":
            return None
        for p in principals:
            over = p.over(tokens, now)
            if over is not None:
                return f"rejected by quota: {over[0]}"
        self._charge(request.request_id, principals, tokens)
        return None

    def hold(self, request: RequestView, now: float) -> str | None:
        """In a dispatch pass at ``now``: None when the request may be dispatched, else why
        it is held (hold mode; always None in reject mode, where arrival decided)."""
        if self.over_limit == "reject" or request.request_id in self._charged:
            return None
        if now != self._pass_s:
            self._pass_s, self._blocked, self._next_release_s = now, {}, None
        tokens = float(request.num_prompt_tokens + request.max_tokens)
        for p in self._principals_of(request.user_id, now):
            blocked = self._blocked.get(id(p))
            if blocked is not None:
                return blocked
            over = p.over(tokens, now)
            if over is not None:
                why, wait = over
                self._blocked[id(p)] = why
                release = now + wait
                if self._next_release_s is None or release < self._next_release_s:
                    self._next_release_s = release
                return why
        return None

    def on_dispatch(self, request: RequestView, now: float) -> None:
        """The request was placed: charge it (hold mode; once, however often it is
        dispatched again after a failure)."""
        if request.request_id in self._charged:
            return
        tokens = float(request.num_prompt_tokens + request.max_tokens)
        self._charge(request.request_id, self._principals_of(request.user_id, now), tokens)

    def on_end(self, request_id: str) -> None:
        """The request reached its terminal state: its slots free up."""
        charged = self._charged.pop(request_id, None)
        if charged:
            for p in charged:
                p.active -= 1
            self._pass_s = float("nan")  # a freed slot may release what this pass held

    def next_release_s(self) -> float | None:
        """The earliest time a request held by a rate limit in the last pass could go (a
        concurrency cap frees when a request ends, which drivers see anyway)."""
        return self._next_release_s

    # ------------------------------------------------------------------ internals
    def _principals_of(self, user: str, now: float) -> list[_Principal]:
        """The user's own principal and its tenant's (those with a limit), made on first use."""
        found = self._of_user.get(user)
        if found is None:
            found = self._of_user[user] = []
            limit = self.user_limits.get(user, self.per_user)
            if limit.is_set:
                found.append(self._principal("user", user, limit, now))
            tenant = self.tenant_of.get(user)
            if tenant is not None:
                limit = self.tenant_limits.get(tenant, self.per_tenant)
                if limit.is_set:
                    found.append(self._principal("tenant", tenant, limit, now))
        return found

    def _principal(self, kind: str, name: str, limit: Limit, now: float) -> _Principal:
        found = self._principals.get((kind, name))
        if found is None:
            found = self._principals[(kind, name)] = _Principal(kind, name, limit, now)
        return found

    def _charge(self, request_id: str, principals: list[_Principal], tokens: float) -> None:
        for p in principals:
            p.charge(tokens)
        self._charged[request_id] = principals
