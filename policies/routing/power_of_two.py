"""Power of two choices: sample two candidates at random, send to the less loaded one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpsim.views import InstanceView, RequestView
from policies.routing.ranking import pick_least_loaded
from policies.routing.rng import router_rng


class PowerOfTwoRouter:
    """``rng`` wins over ``seed``. Load is ``ranking.load_key``; the hint breaks ties."""

    name = "power_of_two"

    def __init__(self, seed: int | None = 0, rng: np.random.Generator | None = None) -> None:
        self.rng = router_rng(seed, rng)

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if len(candidates) <= 2:
            return pick_least_loaded(candidates, request.parallelism_hint)
        first, second = self.rng.choice(len(candidates), size=2, replace=False)
        pair = [candidates[int(first)], candidates[int(second)]]
        return pick_least_loaded(pair, request.parallelism_hint)
