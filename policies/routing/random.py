"""Uniformly random choice among the candidates, from an injected generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpsim.validation import check_non_negative
from cpsim.views import InstanceView, RequestView


class RandomRouter:
    """``rng`` wins over ``seed``; the same seed gives the same choices."""

    name = "random"

    def __init__(self, seed: int | None = 0, rng: np.random.Generator | None = None) -> None:
        if seed is not None:
            check_non_negative("seed", seed, integer=True)
        self.rng = rng if rng is not None else np.random.default_rng(seed)

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None:
        if not candidates:
            return None
        return candidates[int(self.rng.integers(len(candidates)))]
