"""Expert parallelism for MoE models: experts spread over the GPUs, the smallest TP for the rest."""

from __future__ import annotations

from collections.abc import Iterator

from cpsim.models import ModelSpec
from cpsim.parallelism import GPUBudget, ParallelismConfig, powers_of_two
from policies.parallelism.base import FirstFitStrategy


def widest_ep(model: ModelSpec, tp: int, dp: int) -> int:
    """The largest EP that divides num_experts and tp x dp and is a multiple of tp (or, below
    tp, divides it): vLLM's expert parallelism spans a stage's whole TP x DP group."""
    group = tp * dp
    return max(
        ep for ep in range(1, group + 1)
        if model.num_experts % ep == 0 and group % ep == 0 and (ep % tp == 0 or tp % ep == 0)
    )


class ExpertParallelStrategy(FirstFitStrategy):
    """For a MoE model: tp = 1, 2, 4, ... for the attention and dense weights, dp = num_gpus // tp
    replicas, and the experts sharded over ``widest_ep`` GPUs shared by those replicas; the first
    tp that fits wins. A dense model raises (use ``tensor`` or ``hybrid``)."""

    name = "expert"

    def plan(self, model: ModelSpec, budget: GPUBudget) -> ParallelismConfig:
        if not model.is_moe:
            raise ValueError(
                f"model={model.name!r} has num_experts={model.num_experts}; expert parallelism "
                "needs a MoE model (num_experts > 1)"
            )
        return super().plan(model, budget)

    def candidates(self, model: ModelSpec, budget: GPUBudget) -> Iterator[ParallelismConfig]:
        for tp in powers_of_two(1, budget.num_gpus):
            dp = budget.num_gpus // tp
            yield ParallelismConfig(tp=tp, dp=dp, ep=widest_ep(model, tp, dp))
