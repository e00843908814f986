"""A/B test: traffic split between two scheduling-policy-and-router configurations.

Each request belongs to arm A or B, by a stable hash: of its request id (``split="request"``,
a ``fraction_b`` share of requests) or of its user (``split="user"``, a ``fraction_b`` share
of users, each user always in the same arm, so per-user effects such as affinity stay
within an arm). Each arm orders its own requests with its policy and places them with its
router; the arms' orders are interleaved in proportion to their queue lengths, so neither
arm is favoured for free capacity. The arm is recorded with the policy that placed the
request (``A:fifo``, ``B:slo_aware`` in the records' ``policy`` column), which
``experiments.abtest`` reads to compare the arms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from cpsim.protocols import Placement, Router, SchedulingPolicy
from cpsim.validation import check_choice, check_range
from cpsim.views import InstanceView, RequestView

SPLITS = ("request", "user")


def _fraction(key: str) -> float:
    """A stable number in [0, 1) for ``key`` (the same in every process and run)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class _Arm:
    def __init__(self, label: str, spec: Mapping[str, Any]) -> None:
        # imported here: the registries import this module
        from policies import make_policy, make_router

        spec = dict(spec)
        unknown = sorted(set(spec) - {"policy", "router", "policy_args", "router_args"})
        if unknown:
            raise ValueError(
                f"arm {label} keys {unknown} are unknown; allowed: policy, router, "
                "policy_args, router_args"
            )
        self.label = label
        self.policy: SchedulingPolicy = make_policy(
            str(spec.get("policy", "fifo")), **dict(spec.get("policy_args") or {})
        )
        self.router: Router = make_router(
            str(spec.get("router", "load_balanced")), **dict(spec.get("router_args") or {})
        )
        self.name = f"{label}:{self.policy.name}/{self.router.name}"


class ABTestPolicy:
    """Splits traffic between ``arm_a`` and ``arm_b``, each ``{policy: <name>, router:
    <name>}`` (registry names, with optional ``policy_args`` / ``router_args``); ``split``:
    ``request`` or ``user``; ``fraction_b``: the share that goes to B. The core's own
    router is not used: each arm routes with its own."""

    name = "ab_test"

    def __init__(
        self,
        arm_a: Mapping[str, Any] | None = None,
        arm_b: Mapping[str, Any] | None = None,
        split: str = "request",
        fraction_b: float = 0.5,
        salt: str = "cpsim-ab",
    ) -> None:
        check_choice("split", split, SPLITS)
        check_range("fraction_b", fraction_b, 0.0, 1.0)
        self.arms = (
            _Arm("A", arm_a or {"policy": "fifo"}),
            _Arm("B", arm_b or {"policy": "slo_aware"}),
        )
        self.split = split
        self.fraction_b = fraction_b
        self.salt = salt

    def arm_of(self, request: RequestView) -> _Arm:
        key = request.user_id if self.split == "user" else request.request_id
        return self.arms[1] if _fraction(f"{self.salt}:{key}") < self.fraction_b else self.arms[0]

    def order(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> Sequence[RequestView]:
        parts: tuple[list[RequestView], list[RequestView]] = ([], [])
        for request in queue:
            parts[self.arm_of(request) is self.arms[1]].append(request)
        ordered = [
            list(arm.policy.order(part, instances, now))
            for arm, part in zip(self.arms, parts, strict=True)
        ]
        # interleave by position within each arm's order, as a fraction of its length
        keyed = [
            ((i + 0.5) / len(part), side, request)
            for side, part in enumerate(ordered)
            for i, request in enumerate(part)
        ]
        keyed.sort(key=lambda item: (item[0], item[1]))
        return [request for _, _, request in keyed]

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None:
        arm = self.arm_of(request)
        placement = arm.policy.place(request, candidates, arm.router, now)
        if placement is None or placement.instance_id is None:
            return placement
        return placement._replace(policy=f"{arm.label}:{placement.policy or arm.policy.name}")

    def observe(self, request: RequestView, slo_met: bool | None, now: float) -> None:
        self.arm_of(request).policy.observe(request, slo_met, now)
