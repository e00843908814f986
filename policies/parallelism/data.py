"""Data parallelism: one whole model per GPU, as many replicas as GPUs."""

from __future__ import annotations

from collections.abc import Iterator

from cpsim.models import ModelSpec
from cpsim.parallelism import GPUBudget, ParallelismConfig
from policies.parallelism.base import FirstFitStrategy


class DataParallelStrategy(FirstFitStrategy):
    """tp = pp = 1, dp = num_gpus: fits only when the model and a minimum KV cache fit on one
    GPU."""

    name = "data"

    def candidates(self, model: ModelSpec, budget: GPUBudget) -> Iterator[ParallelismConfig]:
        yield ParallelismConfig(dp=budget.num_gpus)
