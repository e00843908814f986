"""Fair sharing across users: the virtual token counter (VTC) of Sheng et al., "Fairness in
Serving Large Language Models" (OSDI 2024).

Each client (a user, or the tenant its user belongs to) has a counter of the service it
received: ``input_weight`` per prompt token and ``output_weight`` per output token, divided
by the client's weight. The next request dispatched is the oldest one of the backlogged
client with the smallest counter, so under overload every backlogged client gets an equal
(weighted) share of tokens, whatever its request rate; when there is capacity for all,
nobody waits for fairness. A client that returns after being idle starts at the smallest
counter of those backlogged, so it cannot spend saved-up credit starving the others.

Service is charged at dispatch: the prompt and ``max_tokens`` (the output the request may
produce; exact for the traces' ignore_eos requests, an upper bound otherwise), since the
control plane does not follow each token of a request on its instance.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence

from cpsim.protocols import Placement, Router
from cpsim.validation import check_positive
from cpsim.views import InstanceView, RequestView
from policies.scheduling.base import BaseSchedulingPolicy


class FairSharePolicy(BaseSchedulingPolicy):
    """Weighted fair sharing of tokens across clients (virtual token counters).

    ``weights``: client -> weight (default 1: a client of weight 2 gets twice the tokens of
    one of weight 1 when both are backlogged); ``tenants``: tenant -> its users, to share by
    tenant instead of by user (users in no tenant are their own client)."""

    name = "fair_share"

    def __init__(
        self,
        input_weight: float = 1.0,
        output_weight: float = 2.0,
        weights: Mapping[str, float] | None = None,
        tenants: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        check_positive("input_weight", input_weight)
        check_positive("output_weight", output_weight)
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.weights = {str(k): float(v) for k, v in (weights or {}).items()}
        for client, weight in self.weights.items():
            check_positive(f"weights[{client!r}]", weight)
        self.client_of: dict[str, str] = {}
        for tenant, users in (tenants or {}).items():
            if isinstance(users, str):
                raise ValueError(
                    f"tenants[{tenant!r}]={users!r} must be a list of user ids, not a string"
                )
            for user in users:
                self.client_of[str(user)] = str(tenant)
        self.counters: dict[str, float] = {}
        self._backlogged: set[str] = set()

    def client(self, request: RequestView) -> str:
        return self.client_of.get(request.user_id, request.user_id)

    def cost(self, request: RequestView) -> float:
        """The counter increment of dispatching ``request`` (weighted tokens / weight)."""
        tokens = (
            self.input_weight * request.num_prompt_tokens + self.output_weight * request.max_tokens
        )
        return tokens / self.weights.get(self.client(request), 1.0)

    def order(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> Sequence[RequestView]:
        """Every queued request, in the order VTC would dispatch them if all were placed:
        repeatedly the oldest request of the client whose counter (plus what it would be
        charged for its requests ahead in this order) is smallest."""
        by_client: dict[str, list[RequestView]] = {}
        for r in queue:  # the queue is in arrival order, so each list is too
            by_client.setdefault(self.client(r), []).append(r)
        self._lift_returning(by_client.keys())
        heap = [(self.counters.get(c, 0.0), c, 0) for c in by_client]
        heapq.heapify(heap)
        out: list[RequestView] = []
        while heap:
            counter, client, i = heapq.heappop(heap)
            request = by_client[client][i]
            out.append(request)
            if i + 1 < len(by_client[client]):
                heapq.heappush(heap, (counter + self.cost(request), client, i + 1))
        return out

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None:
        placement = super().place(request, candidates, router, now)
        if placement is not None:
            client = self.client(request)
            self.counters[client] = self.counters.get(client, 0.0) + self.cost(request)
        return placement

    def _lift_returning(self, backlogged: Iterable[str]) -> None:
        """Clients newly backlogged start no lower than the smallest counter among those
        that stayed backlogged, or, when none stayed, among those last backlogged (VTC's
        counter lift)."""
        now_backlogged = set(backlogged)
        returning = now_backlogged - self._backlogged
        reference = (now_backlogged & self._backlogged) or self._backlogged
        if returning and reference:
            floor = min(self.counters.get(c, 0.0) for c in reference)
            for c in returning:
                self.counters[c] = max(self.counters.get(c, 0.0), floor)
        if now_backlogged:  # an empty queue keeps the last backlogged as the reference
            self._backlogged = now_backlogged
