"""Tensor parallelism: the smallest TP that fits, leftover GPUs as data-parallel replicas."""

from __future__ import annotations

from collections.abc import Iterator

from cpsim.models import ModelSpec
from cpsim.parallelism import GPUBudget, ParallelismConfig, powers_of_two
from policies.parallelism.base import FirstFitStrategy


class TensorParallelStrategy(FirstFitStrategy):
    """tp = 1, 2, 4, ... (within a node, dividing the heads) until the model and a minimum KV
    cache fit; pp = 1; dp = num_gpus // tp. Fails when even a full node's TP does not fit."""

    name = "tensor"

    def candidates(self, model: ModelSpec, budget: GPUBudget) -> Iterator[ParallelismConfig]:
        for tp in powers_of_two(1, budget.num_gpus):
            yield ParallelismConfig(tp=tp, dp=budget.num_gpus // tp)
