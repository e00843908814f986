"""The seed's layout table by model size, made safe: never a layout that does not fit."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

from cpsim.models import ModelSpec
from cpsim.parallelism import (
    GPUBudget,
    ParallelismConfig,
    first_fitting,
    powers_of_two,
    resolve_min_kv_tokens,
)
from policies.parallelism.expert import widest_ep
from policies.parallelism.hybrid import grown_layouts

#: (exclusive upper bound on num_params, preferred (tp, pp) in order). A row's bound is 1.1x its
#: label, so a model named for the label stays in it (Llama-3-70B, 70.6B: the "30-70B" row).
SIZE_ROWS: tuple[tuple[float, tuple[tuple[int, int], ...]], ...] = (
    (11e9, ((1, 1), (2, 1))),  # under 10B: TP1, else TP2
    (33e9, ((4, 1),)),  # 10-30B: TP4
    (77e9, ((4, 1), (8, 1))),  # 30-70B: TP4, else TP8
    (192.5e9, ((4, 2),)),  # 70-175B: TP4 PP2
    (math.inf, ((8, 4),)),  # over 175B: TP8 PP4
)


def size_row(model: ModelSpec) -> tuple[tuple[int, int], ...]:
    """The preferred (tp, pp) of the first row whose bound exceeds ``num_params``."""
    return next(prefs for bound, prefs in SIZE_ROWS if model.num_params < bound)


def _clamped(tp: int, pp: int, num_gpus: int) -> tuple[int, int]:
    """(tp, pp) shrunk to the GPUs at hand: tp to the largest power of two <= num_gpus, then pp."""
    tp = max(powers_of_two(1, min(tp, num_gpus)))
    return tp, max(1, min(pp, num_gpus // tp))


def _table_layouts(model: ModelSpec, budget: GPUBudget) -> Iterator[ParallelismConfig]:
    n = budget.num_gpus
    shapes = [_clamped(tp, pp, n) for tp, pp in size_row(model)]
    for tp, pp in shapes:
        yield ParallelismConfig(tp=tp, pp=pp, dp=n // (tp * pp))
    yield from grown_layouts(*shapes[-1], model, budget)


def _with_experts(model: ModelSpec, config: ParallelismConfig) -> ParallelismConfig:
    """For a MoE model, experts over the widest EP the layout's TP x DP group allows."""
    if not model.is_moe:
        return config
    return replace(config, ep=widest_ep(model, config.tp, config.dp))


def recommend(
    model: ModelSpec,
    num_gpus: int,
    gpu_memory_gb: float = 80.0,
    *,
    gpus_per_node: int = 8,
    min_kv_tokens: int | None = None,
) -> ParallelismConfig:
    """A layout for ``model`` on ``num_gpus`` GPUs of ``gpu_memory_gb`` each, by the seed's table.

    Rows by ``num_params`` (all experts counted for MoE), each row's bound 1.1x its label:
    under 11e9 ("<10B"): TP1, else TP2; [11e9, 33e9) ("10-30B"): TP4; [33e9, 77e9) ("30-70B"):
    TP4, else TP8; [77e9, 192.5e9) ("70-175B"): TP4 PP2; from 192.5e9 (">175B"): TP8 PP4.
    A row's layout is first shrunk to the GPUs at hand (13B on 1 GPU: TP1); if it does not fit
    (weights plus ``min_kv_tokens`` of KV cache, default one full context, see
    ``cpsim.parallelism``), TP then PP grow as in ``HybridParallelStrategy``; if nothing fits,
    NoFittingLayoutError. Leftover GPUs become data-parallel replicas: dp = n // (tp x pp).
    MoE models ("MoE: EP+TP"): the same TP/PP, with the experts spread over the widest EP the
    TP x DP GPUs allow (``widest_ep``; Mixtral-8x7B on 8 GPUs: TP4 DP2 EP8).
    """
    budget = GPUBudget(num_gpus=num_gpus, gpu_memory_gb=gpu_memory_gb, gpus_per_node=gpus_per_node)
    needed = resolve_min_kv_tokens(model, min_kv_tokens)
    layouts = (_with_experts(model, c) for c in _table_layouts(model, budget))
    return first_fitting(model, budget, layouts, needed, "recommended")
