"""Cycle through the instances in registration order, skipping those that do not fit."""

from __future__ import annotations

from collections.abc import Sequence

from cpsim.views import InstanceView, RequestView


class RoundRobinRouter:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice
