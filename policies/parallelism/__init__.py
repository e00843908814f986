"""Parallelism strategies: how to split one model over a GPU budget (TP, PP, DP, EP, hybrid)."""

from __future__ import annotations

from typing import Any

from cpsim.validation import lookup
from policies.parallelism.base import FirstFitStrategy
from policies.parallelism.data import DataParallelStrategy
from policies.parallelism.expert import ExpertParallelStrategy
from policies.parallelism.hybrid import HybridParallelStrategy
from policies.parallelism.pipeline import PipelineParallelStrategy
from policies.parallelism.recommend import recommend
from policies.parallelism.tensor import TensorParallelStrategy

PARALLELISM_STRATEGIES: dict[str, type[FirstFitStrategy]] = {
    "tensor": TensorParallelStrategy,
    "pipeline": PipelineParallelStrategy,
    "data": DataParallelStrategy,
    "expert": ExpertParallelStrategy,
    "hybrid": HybridParallelStrategy,
}



def make_parallelism_strategy(name: str, **kwargs: Any) -> FirstFitStrategy:
    """Build the strategy registered as ``name``; unknown names raise ValueError."""
    return lookup(PARALLELISM_STRATEGIES, name, "parallelism strategy")(**kwargs)


__all__ = [
    "PARALLELISM_STRATEGIES",
    "DataParallelStrategy",
    "ExpertParallelStrategy",
    "HybridParallelStrategy",
    "PipelineParallelStrategy",
    "TensorParallelStrategy",
    "make_parallelism_strategy",
    "recommend",
]
