"""The random generator of a randomised router: injected, or seeded for reproducible runs."""

from __future__ import annotations

import numpy as np

from cpsim.validation import check_non_negative


def router_rng(seed: int | None, rng: np.random.Generator | None) -> np.random.Generator:
    """``rng`` when given (it wins over ``seed``); else a generator seeded with ``seed``."""
    if rng is not None:
        return rng
    if seed is not None:
        check_non_negative("seed", seed, integer=True)
    return np.random.default_rng(seed)
