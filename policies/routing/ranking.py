"""Orderings shared by routers and policies: least loaded first, the parallelism hint on ties."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cpsim.types import ParallelismType
from cpsim.views import InstanceView


def effective_load(view: InstanceView) -> float:
    """Outstanding requests (ours or the engine's count, the larger) over capacity, plus
    the instance's recent error rate: a failed request is cost, not free capacity, so an
    instance that fails everything at once looks as busy as a full one, not idle."""
    engine = view.num_running + view.num_waiting  # view.outstanding, inlined: a hot path
    ours = view.in_flight
    return (ours if ours > engine else engine) / view.max_concurrent_requests + (
        view.recent_error_rate
    )


def load_key(view: InstanceView) -> tuple[float, int, float]:
    """Smaller is less loaded: ``effective_load``, then prompt tokens still waiting for
    prefill, then KV-cache usage."""
    return (effective_load(view), view.pending_prefill_tokens, view.kv_cache_usage_frac)


def hint_miss(view: InstanceView, hint: ParallelismType | None) -> int:
    """0 when the instance has the hinted parallelism (or there is no hint), else 1."""
    return 0 if hint is None or hint in view.parallelism_types() else 1


def pick_min(
    candidates: Sequence[InstanceView],
    key: Callable[[InstanceView], Any],
    hint: ParallelismType | None,
) -> InstanceView | None:
    """The candidate with the smallest ``key``; among equal keys the one matching the
    hint, then the earliest in ``candidates``."""
    if not candidates:
        return None
    if hint is None:  # the common case: no tie-break key to build per candidate
        return min(candidates, key=key)
    return min(candidates, key=lambda v: (key(v), hint_miss(v, hint)))


def pick_least_loaded(
    candidates: Sequence[InstanceView], hint: ParallelismType | None
) -> InstanceView | None:
    """``pick_min(candidates, load_key, hint)``; without a hint as a plain loop, the same
    choice without a key tuple per candidate (every dispatch ranks every instance)."""
    if hint is not None or not candidates:
        return pick_min(candidates, load_key, hint)
    best = candidates[0]
    best_frac = effective_load(best)
    best_pending, best_kv = best.pending_prefill_tokens, best.kv_cache_usage_frac
    for k in range(1, len(candidates)):
        view = candidates[k]
        frac = effective_load(view)
        if frac > best_frac:
            continue
        pending, kv = view.pending_prefill_tokens, view.kv_cache_usage_frac
        if frac == best_frac and (
            pending > best_pending or (pending == best_pending and kv >= best_kv)
        ):
            continue  # not smaller: the earliest of equal keys stays, as min() keeps it
        best, best_frac, best_pending, best_kv = view, frac, pending, kv
    return best
