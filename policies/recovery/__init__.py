"""Fault-recovery policies (cpsim.protocols.RestartPolicy, LinkPolicy).

- ``backoff`` (a RestartPolicy): restart an engine whose process died after a delay that
  doubles with each crash in a window, and give up on one that keeps crashing, as
  Kubernetes' CrashLoopBackOff does;
- ``link_breaker`` (a LinkPolicy): a circuit breaker per KV path (prefill instance ->
  decode instance) that cuts a path after its hand-offs fail on the link, lets one probe
  through after a back-off, and closes it again when the probe's KV arrives.

The drivers carry them out: the simulated cluster restarts replicas (backends/sim/cluster.py),
``backends.live_restart.EngineSupervisor`` restarts real engine processes, and the core
(cpsim/core.py) keeps hand-offs off cut paths in both.
"""

from __future__ import annotations

from typing import Any

from cpsim.protocols import LinkPolicy, RestartPolicy
from cpsim.validation import lookup
from policies.recovery.link_breaker import LinkBreaker
from policies.recovery.restart import BackoffRestart

RESTART_POLICIES: dict[str, type[RestartPolicy]] = {"backoff": BackoffRestart}
LINK_POLICIES: dict[str, type[LinkPolicy]] = {"link_breaker": LinkBreaker}


def make_restart_policy(name: str, **kwargs: Any) -> RestartPolicy:
    """Build the restart policy registered as ``name``; unknown names raise ValueError."""
    return lookup(RESTART_POLICIES, name, "restart policy")(**kwargs)


def make_link_policy(name: str, **kwargs: Any) -> LinkPolicy:
    """Build the link policy registered as ``name``; unknown names raise ValueError."""
    return lookup(LINK_POLICIES, name, "link policy")(**kwargs)


__all__ = [
    "LINK_POLICIES",
    "RESTART_POLICIES",
    "BackoffRestart",
    "LinkBreaker",
    "make_link_policy",
    "make_restart_policy",
]
