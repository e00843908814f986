"""Decisions: scheduling policies, routers, PD splitting and parallelism; pure and synchronous."""

from __future__ import annotations

from policies.routing.round_robin import RoundRobinRouter
from policies.scheduling.fifo import FIFOPolicy

SCHEDULING_POLICIES: dict[str, type] = {"fifo": FIFOPolicy}
ROUTERS: dict[str, type] = {"round_robin": RoundRobinRouter}
PD_POLICIES: dict[str, type] = {}
