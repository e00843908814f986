"""User affinity: a user's requests stay on one instance (a warm cache) until it is overloaded."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

from cpsim.types import RequestMetadata
from cpsim.validation import check_positive, check_range
from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import effective_load, pick_least_loaded

#: Requests that name no user carry this id; pinning them all to one instance would pile
#: every anonymous request onto it, so they go to the least loaded instance instead.
ANONYMOUS_USER_ID = str(
    next(f.default for f in dataclasses.fields(RequestMetadata) if f.name == "user_id")
)


class AffinityRouter:
    """The pinned instance while it is a candidate (healthy, with capacity, serving the
    request) and its load (``ranking.effective_load``) is below ``max_load_frac``; otherwise
    the least loaded candidate, which becomes the user's new pin. The pin table keeps the
    ``max_pinned_users`` most recently routed users."""

    name = "affinity"

    def __init__(self, max_load_frac: float = 0.8, max_pinned_users: int = 100_000) -> None:
        check_range("max_load_frac", max_load_frac, 0.0, 1.0)
        check_positive("max_pinned_users", max_pinned_users, integer=True)
        self.max_load_frac = max_load_frac
        self.max_pinned_users = max_pinned_users
        self.pins: OrderedDict[str, str] = OrderedDict()

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        user = request.user_id
        if user == ANONYMOUS_USER_ID:
            return pick_least_loaded(candidates, request.parallelism_hint)
        pinned = self.pins.get(user)
        for view in candidates:
            if view.instance_id == pinned and effective_load(view) < self.max_load_frac:
                self.pins.move_to_end(user)
                return view
        choice = pick_least_loaded(candidates, request.parallelism_hint)
        assert choice is not None
        self.pins[user] = choice.instance_id
        self.pins.move_to_end(user)
        if len(self.pins) > self.max_pinned_users:
            self.pins.popitem(last=False)
        return choice
