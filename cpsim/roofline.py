"""Roofline step latency: FLOPs and bytes against peak compute and bandwidth, with TP/PP."""

from __future__ import annotations

from dataclasses import dataclass

from cpsim.gpus import GPUSpec, load_gpu_spec
from cpsim.latency import StepBatch
from cpsim.models import ModelSpec, load_model_spec
from cpsim.profiles import predict_from_steps
from cpsim.protocols import LatencyEstimate
from cpsim.validation import check_non_negative, check_positive, check_range
from cpsim.views import InstanceView, RequestView

ACTIVATION_BYTES = 2.0  # bf16 activations on the wire


@dataclass(frozen=True, slots=True)
class StageCost:
    """One pipeline stage's work for one micro-batch, per GPU, split into its parts (s)."""

    compute_s: float
    memory_s: float
    comm_s: float

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.comm_s

    @property
    def is_memory_bound(self) -> bool:
        return self.memory_s >= self.compute_s


class RooflineLatencyModel:
    """Step time from first principles, for hardware without a profile (derived, not measured).

    Per step: linear layers 2 x active params FLOPs per token; attention 4 x layers x hidden
    FLOPs per (query, key) pair (a prefill chunk of c tokens after p tokens of context: c^2/2
    + c*p pairs; a decode token: its context); bytes = weights once per step + KV read for
    the context + KV written for the new tokens. Each GPU holds 1/tp of every layer and 1/pp
    of the layers; its time is max(compute at ``compute_efficiency`` of peak, bytes at
    ``bandwidth_efficiency`` of memory bandwidth), plus TP: two ring all-reduces of the
    activations per layer over the link (one direction), each with ``link_latency_s``.

    Pipeline parallelism, as stage-pipelined steps: a step advances every scheduled sequence
    once; its sequences are split into m = min(pp, sequences) micro-batches that follow each
    other through the pp stages, so in steady state a step costs pp stage-times of one
    micro-batch (pp x stage(batch / m)) plus (pp - 1) activation hand-offs on its critical
    path. A lone sequence (m = 1) thus costs the whole model's time; pp micro-batches fill
    the pipeline. ``overhead_s`` is the per-step CPU cost (scheduling, launches)."""

    def __init__(
        self,
        model: ModelSpec | str,
        gpu: GPUSpec | str,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        compute_efficiency: float = 0.6,
        bandwidth_efficiency: float = 0.8,
        overhead_s: float = 0.004,
        link_latency_s: float = 10e-6,
        max_num_batched_tokens: int = 8192,
    ) -> None:
        self.model = load_model_spec(model) if isinstance(model, str) else model
        self.gpu = load_gpu_spec(gpu) if isinstance(gpu, str) else gpu
        check_positive("tensor_parallel_size", tensor_parallel_size, integer=True)
        check_positive("pipeline_parallel_size", pipeline_parallel_size, integer=True)
        check_range("compute_efficiency", compute_efficiency, 0.01, 1.0)
        check_range("bandwidth_efficiency", bandwidth_efficiency, 0.01, 1.0)
        check_non_negative("overhead_s", overhead_s)
        check_non_negative("link_latency_s", link_latency_s)
        if pipeline_parallel_size > self.model.num_layers:
            raise ValueError(
                f"pipeline_parallel_size={pipeline_parallel_size} exceeds the "
                f"{self.model.num_layers} layers of {self.model.name}"
            )
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.compute_efficiency = compute_efficiency
        self.bandwidth_efficiency = bandwidth_efficiency
        self.overhead_s = overhead_s
        self.link_latency_s = link_latency_s
        self.max_num_batched_tokens = max_num_batched_tokens

    def stage_cost(self, batch: StepBatch, num_micro_batches: int = 1) -> StageCost:
        """Cost of one stage for one of ``num_micro_batches`` equal parts of ``batch``."""
        m = float(num_micro_batches)
        spec, tp, pp = self.model, self.tensor_parallel_size, self.pipeline_parallel_size
        prefill_tokens = batch.num_prefill_tokens / m
        decode_seqs = batch.num_decode_seqs / m
        tokens = prefill_tokens + decode_seqs
        mean_context = batch.prefill_context_tokens / max(1, batch.num_prefill_seqs)
        pairs = (
            batch.sum_sq_prefill_tokens / 2.0 / m
            + prefill_tokens * mean_context
            + batch.decode_context_tokens / m
        )
        flops = 2.0 * spec.active_params * tokens + 4.0 * spec.num_layers * spec.hidden_size * pairs
        kv_tokens = (batch.decode_context_tokens + batch.prefill_context_tokens) / m + tokens
        bytes_moved = spec.weight_bytes + spec.kv_bytes_per_token() * kv_tokens
        gpus = tp * pp
        gpu = self.gpu
        compute_s = flops / gpus / (gpu.peak_flops * self.compute_efficiency)
        memory_s = bytes_moved / gpus / (gpu.memory_bandwidth_bytes_s * self.bandwidth_efficiency)
        comm_s = 0.0
        if tp > 1:
            layers = spec.num_layers / pp
            message = tokens * spec.hidden_size * ACTIVATION_BYTES
            per_all_reduce = (
                2.0 * (tp - 1) / tp * message / gpu.link_bytes_s_per_direction + self.link_latency_s
            )
            comm_s = 2.0 * layers * per_all_reduce
        return StageCost(compute_s, memory_s, comm_s)

    def step_time_s(self, batch: StepBatch) -> float:
        if batch.num_prefill_tokens == 0 and batch.num_decode_seqs == 0:
            return 0.0
        pp = self.pipeline_parallel_size
        seqs = batch.num_prefill_seqs + batch.num_decode_seqs
        micro = max(1, min(pp, seqs))
        stage = self.stage_cost(batch, micro)
        time_s = self.overhead_s + pp * stage.time_s
        if pp > 1:
            tokens = (batch.num_prefill_tokens + batch.num_decode_seqs) / micro
            handoff_bytes = tokens * self.model.hidden_size * ACTIVATION_BYTES
            time_s += (pp - 1) * (
                handoff_bytes / self.gpu.link_bytes_s_per_direction + self.link_latency_s
            )
        return time_s

    def predict(self, request: RequestView, instance: InstanceView) -> LatencyEstimate:
        return predict_from_steps(self, request, instance, self.max_num_batched_tokens)

    def __repr__(self) -> str:
        return (
            f"RooflineLatencyModel({self.model.name!r}, {self.gpu.name!r}, "
            f"tp={self.tensor_parallel_size}, pp={self.pipeline_parallel_size})"
        )
