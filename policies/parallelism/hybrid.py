"""The seed's hybrid layout by GPU count (TP4, PP2 from 16 GPUs), grown until the model fits."""

from __future__ import annotations

from collections.abc import Iterator

from cpsim.models import ModelSpec
from cpsim.parallelism import GPUBudget, ParallelismConfig, powers_of_two
from policies.parallelism.base import FirstFitStrategy


def seed_layout(num_gpus: int) -> tuple[int, int]:
    """The seed's (tp, pp): 16+ GPUs: (4, 2); 4-15: (4, 1); under 4: (min(n, 2), 1)."""
    if num_gpus >= 16:
        return 4, 2
    if num_gpus >= 4:
        return 4, 1
    return min(num_gpus, 2), 1


def grown_layouts(
    tp: int, pp: int, model: ModelSpec, budget: GPUBudget
) -> Iterator[ParallelismConfig]:
    """(tp, pp) first, then tp doubled up to what the GPUs allow, then pp + 1 with tp restarting
    from ``tp``, and so on; dp = num_gpus // (tp x pp) replicas each time."""
    n = budget.num_gpus
    for stages in range(pp, min(n // tp, model.num_layers) + 1):
        for width in powers_of_two(tp, n // stages):
            yield ParallelismConfig(tp=width, pp=stages, dp=n // (width * stages))


class HybridParallelStrategy(FirstFitStrategy):
    """The seed's rules (16+ GPUs: TP4 PP2 DP auto; 8-15: TP4 DP auto; 4-7: TP4; under 4:
    TP min(n, 2)), then ``grown_layouts`` when that layout does not fit; raises when none fits.
    The seed's layout is kept even when a smaller one would fit (8B on 16 GPUs: TP4 PP2 DP2)."""

    name = "hybrid"

    def candidates(self, model: ModelSpec, budget: GPUBudget) -> Iterator[ParallelismConfig]:
        tp, pp = seed_layout(budget.num_gpus)
        return grown_layouts(tp, pp, model, budget)
