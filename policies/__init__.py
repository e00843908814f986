"""Decisions: scheduling policies, routers, PD splitting and parallelism; pure and synchronous."""

from __future__ import annotations

from typing import Any

from cpsim.protocols import PDPolicy, Router, SchedulingPolicy
from cpsim.validation import lookup
from policies.parallelism import (
    PARALLELISM_STRATEGIES,
    make_parallelism_strategy,
    recommend,
)
from policies.pd.adaptive import AdaptivePDPolicy
from policies.pd.threshold import ThresholdPDPolicy
from policies.routing.affinity import AffinityRouter
from policies.routing.load_balanced import LoadBalancedRouter
from policies.routing.locality import AdapterAffinityRouter, LocalityRouter
from policies.routing.power_of_two import PowerOfTwoRouter
from policies.routing.prefix_cache_aware import PrefixCacheAwareRouter
from policies.routing.random import RandomRouter
from policies.routing.round_robin import RoundRobinRouter
from policies.routing.weighted_round_robin import WeightedRoundRobinRouter
from policies.scheduling.ab_test import ABTestPolicy
from policies.scheduling.adaptive import AdaptivePolicy
from policies.scheduling.cost_optimized import CostOptimizedPolicy
from policies.scheduling.fair_share import FairSharePolicy
from policies.scheduling.fifo import FIFOPolicy
from policies.scheduling.priority import PriorityPolicy
from policies.scheduling.slo_aware import SLOAwarePolicy

SCHEDULING_POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fifo": FIFOPolicy,
    "priority": PriorityPolicy,
    "slo_aware": SLOAwarePolicy,
    "cost_optimized": CostOptimizedPolicy,
    "adaptive": AdaptivePolicy,
    "fair_share": FairSharePolicy,
    "ab_test": ABTestPolicy,
}
ROUTERS: dict[str, type[Router]] = {
    "round_robin": RoundRobinRouter,
    "random": RandomRouter,
    "load_balanced": LoadBalancedRouter,
    "power_of_two": PowerOfTwoRouter,
    "weighted_round_robin": WeightedRoundRobinRouter,
    "affinity": AffinityRouter,
    "locality": LocalityRouter,
    "prefix_cache_aware": PrefixCacheAwareRouter,
    "lora_affinity": AdapterAffinityRouter,
}
PD_POLICIES: dict[str, type[PDPolicy]] = {
    "threshold": ThresholdPDPolicy,
    "adaptive": AdaptivePDPolicy,
}


def make_policy(name: str, **kwargs: Any) -> SchedulingPolicy:
    """Build the scheduling policy registered as ``name``; unknown names raise ValueError."""
    return lookup(SCHEDULING_POLICIES, name, "scheduling policy")(**kwargs)


def make_router(name: str, **kwargs: Any) -> Router:
    """Build the router registered as ``name``; unknown names raise ValueError."""
    return lookup(ROUTERS, name, "router")(**kwargs)


def make_pd_policy(name: str, **kwargs: Any) -> PDPolicy:
    """Build the PD policy registered as ``name``; unknown names raise ValueError."""
    return lookup(PD_POLICIES, name, "PD policy")(**kwargs)


__all__ = [
    "PARALLELISM_STRATEGIES",
    "PD_POLICIES",
    "ROUTERS",
    "SCHEDULING_POLICIES",
    "make_parallelism_strategy",
    "make_pd_policy",
    "make_policy",
    "make_router",
    "recommend",
]
