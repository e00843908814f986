"""Shared shape of the parallelism strategies: list candidate layouts, keep the first that fits."""

from __future__ import annotations

from collections.abc import Iterable

from cpsim.models import ModelSpec
from cpsim.parallelism import GPUBudget, ParallelismConfig, first_fitting, resolve_min_kv_tokens
from cpsim.validation import check_positive


class FirstFitStrategy:
    """Tries ``candidates`` in order and returns the first layout that fits.

    ``min_kv_tokens``: KV-cache tokens each replica must hold besides its weights; None means
    one sequence of the model's ``max_context_tokens``."""

    name = "first_fit"

    def __init__(self, min_kv_tokens: int | None = None) -> None:
        if min_kv_tokens is not None:
            check_positive("min_kv_tokens", min_kv_tokens, integer=True)
        self.min_kv_tokens = min_kv_tokens

    def plan(self, model: ModelSpec, budget: GPUBudget) -> ParallelismConfig:
        needed = resolve_min_kv_tokens(model, self.min_kv_tokens)
        return first_fitting(model, budget, self.candidates(model, budget), needed, self.name)

    def candidates(self, model: ModelSpec, budget: GPUBudget) -> Iterable[ParallelismConfig]:
        raise NotImplementedError
