"""Uniformly random choice among the candidates, from an injected generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpsim.views import InstanceView, RequestView
from policies.routing.rng import router_rng


class RandomRouter:
    """``rng`` wins over ``seed``; the same seed gives the same choices."""

    name = "random"

    def __init__(self, seed: int | None = 0, rng: np.random.Generator | None = None) -> None:
        self.rng = router_rng(seed, rng)

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        return candidates[int(self.rng.integers(len(candidates)))]
