"""Pipeline parallelism: the fewest pipeline stages that fit, leftover GPUs as replicas."""

from __future__ import annotations

from collections.abc import Iterator

from cpsim.models import ModelSpec
from cpsim.parallelism import GPUBudget, ParallelismConfig
from policies.parallelism.base import FirstFitStrategy


class PipelineParallelStrategy(FirstFitStrategy):
    """pp = 1, 2, 3, ... (at most num_layers; stages may be uneven, as vLLM allows) until the
    fullest stage and its KV cache fit; tp = 1; dp = num_gpus // pp."""

    name = "pipeline"

    def candidates(self, model: ModelSpec, budget: GPUBudget) -> Iterator[ParallelismConfig]:
        for pp in range(1, min(budget.num_gpus, model.num_layers) + 1):
            yield ParallelismConfig(pp=pp, dp=budget.num_gpus // pp)
