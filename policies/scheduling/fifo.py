"""First come, first served: the queue is already in arrival order."""

from __future__ import annotations

from policies.scheduling.base import BaseSchedulingPolicy


class FIFOPolicy(BaseSchedulingPolicy):
    name = "fifo"
