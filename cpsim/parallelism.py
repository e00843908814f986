"""Parallel layouts of one model (TP x PP x DP GPUs, EP over experts) and the rule that decides
whether a layout fits in GPU memory.

The fit rule, per GPU of the fullest pipeline stage (all sizes in decimal GB, 1 GB = 1e9 bytes):

    usable  = gpu_memory_gb x gpu_memory_utilization - runtime_overhead_gb
    weights = stage_frac x (dense_bytes / tp + expert_bytes / max(tp, ep))
    KV      = usable - weights, which must hold at least ``min_kv_tokens`` tokens per replica

``gpu_memory_utilization`` is vLLM's knob of the same name (the share of memory the engine may
take); ``runtime_overhead_gb`` covers what is neither weights nor KV cache (activations of the
largest batch, CUDA graphs, NCCL buffers; vLLM's profiling run typically finds 1-4 GB).
``stage_frac = ceil(num_layers / pp) / num_layers``: the fullest stage when layers do not split
evenly (vLLM allows uneven stages); embeddings are spread with the layers, an approximation.
Expert weights are sharded over ``max(tp, ep)`` GPUs: ``ep`` GPUs each hold ``num_experts / ep``
whole experts, and with ``ep < tp`` the experts are further tensor-sharded.
A GPU holds ``max(1, num_kv_heads / tp)`` KV heads: past ``num_kv_heads`` vLLM replicates them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypedDict, runtime_checkable

from cpsim.models import ModelSpec
from cpsim.types import DEFAULT_GPUS_PER_NODE, ParallelismType
from cpsim.validation import check_non_negative, check_positive, check_range

GB = 1e9
_MAX_TRIED_SHOWN = 6


class NoFittingLayoutError(ValueError):
    """No layout a strategy may use fits the model in the budget (message says why)."""


@dataclass(frozen=True, slots=True)
class GPUBudget:
    """The GPUs one model's deployment may use. ``interconnect_bandwidth_gb_per_s`` is carried for
    latency models; the fit rule does not use it."""

    num_gpus: int
    gpu_memory_gb: float
    interconnect_bandwidth_gb_per_s: float = 600.0
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    gpu_memory_utilization: float = 0.9
    runtime_overhead_gb: float = 2.0

    def __post_init__(self) -> None:
        check_positive("num_gpus", self.num_gpus, integer=True)
        check_positive("gpu_memory_gb", self.gpu_memory_gb)
        check_positive("interconnect_bandwidth_gb_per_s", self.interconnect_bandwidth_gb_per_s)
        check_positive("gpus_per_node", self.gpus_per_node, integer=True)
        check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0)
        check_positive("gpu_memory_utilization", self.gpu_memory_utilization)
        check_non_negative("runtime_overhead_gb", self.runtime_overhead_gb)

    @property
    def usable_bytes_per_gpu(self) -> float:
        """Bytes left per GPU for weights and KV cache (may be <= 0 for a tiny GPU)."""
        return (self.gpu_memory_gb * self.gpu_memory_utilization - self.runtime_overhead_gb) * GB

    def describe(self) -> str:
        return (
            f"{self.num_gpus} GPU(s) x {self.gpu_memory_gb:g} GB, "
            f"{self.usable_bytes_per_gpu / GB:.1f} GB usable per GPU "
            f"(gpu_memory_utilization={self.gpu_memory_utilization:g}, "
            f"runtime_overhead_gb={self.runtime_overhead_gb:g})"
        )


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """One layout's memory per GPU (the fullest pipeline stage) and its KV capacity."""

    weight_bytes_per_gpu: float
    usable_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_capacity_tokens: int  # per replica: every GPU of a replica holds its share of each token

    @property
    def kv_cache_bytes_per_gpu(self) -> float:
        return max(0.0, self.usable_bytes_per_gpu - self.weight_bytes_per_gpu)

    def fits(self, min_kv_tokens: int) -> bool:
        return self.kv_capacity_tokens >= min_kv_tokens

    def describe(self) -> str:
        return (
            f"weights {self.weight_bytes_per_gpu / GB:.1f} GB/GPU of "
            f"{self.usable_bytes_per_gpu / GB:.1f} GB usable, KV cache "
            f"{self.kv_cache_bytes_per_gpu / GB:.1f} GB/GPU = "
            f"{self.kv_capacity_tokens:,} tokens/replica"
        )


def expert_param_count(model: ModelSpec) -> float:
    """Parameters in routed experts: layers x experts x 3 x hidden x intermediate (gated MLP
    experts, as in Mixtral and OLMoE); 0 for a dense model; never more than ``num_params``."""
    if not model.is_moe:
        return 0.0
    per_layer = model.num_experts * 3 * model.hidden_size * model.intermediate_size
    return float(min(model.num_params, model.num_layers * per_layer))


def weight_bytes_per_gpu(
    model: ModelSpec, tp: int, ep: int = 1, stage_fraction: float = 1.0
) -> float:
    """One GPU's weights: ``stage_fraction`` of the layers, 1/tp of each, and 1/max(tp, ep)
    of a MoE's routed experts."""
    expert_bytes = expert_param_count(model) * model.bytes_per_param
    dense_bytes = model.weight_bytes - expert_bytes
    return stage_fraction * (dense_bytes / tp + expert_bytes / max(tp, ep))


class InstanceParallelFields(TypedDict):
    """``cpsim.types.ExecutionInstance`` keyword arguments that describe a layout."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    expert_parallel_size: int
    gpu_count: int


@dataclass(frozen=True, slots=True)
class ParallelismConfig:
    """A layout: ``dp`` replicas of ``tp x pp`` GPUs each; ``ep`` GPUs of a stage's ``tp x dp``
    group share the experts (vLLM's expert parallelism; ep=1: experts tensor-sharded by tp)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep"):
            check_positive(name, getattr(self, name), integer=True)

    @property
    def gpu_count(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_gpu_count(self) -> int:
        return self.tp * self.pp

    @property
    def kind(self) -> ParallelismType:
        """EP (with any TP/DP) and no PP: EXPERT_PARALLEL; else the one dimension above 1;
        several: HYBRID; none (one GPU) is a single data-parallel replica: DATA_PARALLEL."""
        if self.ep > 1 and self.pp == 1:
            return ParallelismType.EXPERT_PARALLEL
        used = [kind for size, kind in (
            (self.tp, ParallelismType.TENSOR_PARALLEL),
            (self.pp, ParallelismType.PIPELINE_PARALLEL),
            (self.dp, ParallelismType.DATA_PARALLEL),
            (self.ep, ParallelismType.EXPERT_PARALLEL),
        ) if size > 1]
        if not used:
            return ParallelismType.DATA_PARALLEL
        return used[0] if len(used) == 1 else ParallelismType.HYBRID

    def memory(self, model: ModelSpec, budget: GPUBudget) -> MemoryBreakdown:
        """Weights and KV cache per GPU under the module's fit rule."""
        layers_per_stage = math.ceil(model.num_layers / self.pp)
        stage_frac = layers_per_stage / model.num_layers
        weights = weight_bytes_per_gpu(model, self.tp, self.ep, stage_frac)
        kv_heads_frac = max(1, math.ceil(model.num_kv_heads / self.tp)) / model.num_kv_heads
        kv_per_token = model.kv_bytes_per_token() * stage_frac * kv_heads_frac
        usable = budget.usable_bytes_per_gpu
        tokens = int(max(0.0, usable - weights) // kv_per_token)
        return MemoryBreakdown(weights, usable, kv_per_token, tokens)

    def instance_fields(self) -> InstanceParallelFields:
        """The matching ``cpsim.types.ExecutionInstance`` keyword arguments."""
        return {
            "tensor_parallel_size": self.tp,
            "pipeline_parallel_size": self.pp,
            "data_parallel_size": self.dp,
            "expert_parallel_size": self.ep,
            "gpu_count": self.gpu_count,
        }

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} ep={self.ep}"


@runtime_checkable
class ParallelismStrategy(Protocol):
    """Chooses a layout for a model in a GPU budget: one that fits (``layout_problem`` is None
    for it and it uses at most ``budget.num_gpus`` GPUs), or raises NoFittingLayoutError."""

    name: str

    def plan(self, model: ModelSpec, budget: GPUBudget) -> ParallelismConfig: ...


def resolve_min_kv_tokens(model: ModelSpec, min_kv_tokens: int | None) -> int:
    """The KV tokens a replica must hold: the given number, or one full-context sequence."""
    if min_kv_tokens is None:
        return model.max_context_tokens
    check_positive("min_kv_tokens", min_kv_tokens, integer=True)
    return int(min_kv_tokens)


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two in [low, high], ascending."""
    out, value = [], 1
    while value <= high:
        if value >= low:
            out.append(value)
        value *= 2
    return out


def _shape_problem(config: ParallelismConfig, model: ModelSpec, budget: GPUBudget) -> str | None:
    """Why ``config`` cannot run ``model`` at all (GPU count, heads, layers, experts), or None.
    TP: a power of two within a node dividing the attention heads, and either dividing the KV
    heads or a multiple of them (vLLM then replicates KV heads)."""
    tp, ep = config.tp, config.ep
    kv_heads = model.num_kv_heads
    checks = (
        (config.gpu_count > budget.num_gpus,
         f"needs {config.gpu_count} GPUs, budget has num_gpus={budget.num_gpus}"),
        (tp & (tp - 1) != 0, f"tp={tp} is not a power of two"),
        (tp > budget.gpus_per_node, f"tp={tp} spans nodes (gpus_per_node={budget.gpus_per_node})"),
        (model.num_attention_heads % tp != 0,
         f"tp={tp} does not divide num_attention_heads={model.num_attention_heads}"),
        (kv_heads % tp != 0 and tp % kv_heads != 0,
         f"tp={tp} neither divides nor is a multiple of num_kv_heads={kv_heads}"),
        (config.pp > model.num_layers, f"pp={config.pp} exceeds num_layers={model.num_layers}"),
        (ep > 1 and not model.is_moe, f"ep={ep} needs a MoE model (num_experts=1)"),
        (model.num_experts % ep != 0, f"ep={ep} does not divide num_experts={model.num_experts}"),
        ((tp * config.dp) % ep != 0, f"ep={ep} does not divide tp x dp = {tp * config.dp}"),
        (ep % tp != 0 and tp % ep != 0, f"ep={ep} and tp={tp}: neither divides the other"),
    )
    return next((reason for failed, reason in checks if failed), None)


def layout_problem(
    config: ParallelismConfig, model: ModelSpec, budget: GPUBudget, min_kv_tokens: int
) -> str | None:
    """Why ``config`` does not fit (shape or memory), or None when it fits."""
    shape = _shape_problem(config, model, budget)
    if shape is not None:
        return shape
    memory = config.memory(model, budget)
    if memory.fits(min_kv_tokens):
        return None
    return f"{memory.describe()} < min_kv_tokens={min_kv_tokens:,}"


def first_fitting(
    model: ModelSpec,
    budget: GPUBudget,
    candidates: Iterable[ParallelismConfig],
    min_kv_tokens: int,
    strategy: str,
) -> ParallelismConfig:
    """The first candidate that fits; else NoFittingLayoutError saying what was tried and why."""
    tried: list[str] = []
    seen: set[ParallelismConfig] = set()
    for config in candidates:
        if config in seen:
            continue
        seen.add(config)
        problem = layout_problem(config, model, budget, min_kv_tokens)
        if problem is None:
            return config
        tried.append(f"{config}: {problem}")
    raise NoFittingLayoutError(_no_fit_message(model, budget, min_kv_tokens, strategy, tried))


def _no_fit_message(
    model: ModelSpec, budget: GPUBudget, min_kv_tokens: int, strategy: str, tried: list[str]
) -> str:
    kv_gb = model.kv_bytes_per_token() * min_kv_tokens / GB
    shown = tried[:_MAX_TRIED_SHOWN]
    if len(tried) > len(shown):
        shown.append(f"... and {len(tried) - len(shown)} more")
    return (
        f"no {strategy} layout fits {model.name}: it needs {model.weight_bytes / GB:.1f} GB of "
        f"weights ({model.num_params / 1e9:.2f}B params x {model.bytes_per_param:g} bytes) plus "
        f"{kv_gb:.1f} GB of KV cache per replica for min_kv_tokens={min_kv_tokens:,}; "
        f"budget: {budget.describe()}; tried: " + ("; ".join(shown) or "no candidate layout")
    )
