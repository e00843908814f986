"""Analytical step latency: FLOPs and bytes against the GPU's achieved compute and bandwidth,
with TP all-reduces, PP stages, MoE experts and EP all-to-alls and the engine's fixed costs,
calibrated on public data."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cpsim.calibration import (
    Calibration,
    LinkCost,
    calibration_for_gpu,
    load_calibration,
)
from cpsim.gpus import GPUSpec, load_gpu_spec
from cpsim.latency import StepBatch
from cpsim.models import ModelSpec, load_model_spec
from cpsim.parallelism import expert_param_count
from cpsim.profiles import predict_from_steps
from cpsim.protocols import LatencyEstimate
from cpsim.types import DEFAULT_GPUS_PER_NODE
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import InstanceView, RequestView

ACTIVATION_BYTES = 2.0  # bf16 activations on the wire
FALLBACK_CALIBRATION = "vllm-a100-80gb"  # for a GPU with none of its own: the most measured
NOMINAL_LINK_LATENCY_S = 10e-6  # an all-reduce or hand-off on a link nothing measured
NOMINAL_NODE_NETWORK_BYTES_S = 25e9  # one 200 Gb/s NIC per GPU, where nothing measured


@dataclass(frozen=True, slots=True)
class StageCost:
    """One pipeline stage's work for one micro-batch, per GPU, split into its parts (s):
    the linear layers' compute and memory time (``overlap_exponent`` joins them), attention,
    TP all-reduces and the fixed per-layer cost."""

    compute_s: float
    memory_s: float
    attention_s: float
    comm_s: float
    overhead_s: float
    overlap_exponent: float

    @property
    def time_s(self) -> float:
        p = self.overlap_exponent
        linear: float = (self.compute_s**p + self.memory_s**p) ** (1.0 / p)
        return linear + self.attention_s + self.comm_s + self.overhead_s

    @property
    def is_memory_bound(self) -> bool:
        return self.memory_s >= self.compute_s


def nominal_all_reduce(gpu: GPUSpec, tensor_parallel_size: int) -> LinkCost:
    """A ring all-reduce at the link's quoted bandwidth: 2 (tp - 1) / tp of the message
    crosses each GPU's link one way."""
    tp = tensor_parallel_size
    return LinkCost(NOMINAL_LINK_LATENCY_S, gpu.link_bytes_s_per_direction * tp / (2.0 * (tp - 1)))


class RooflineLatencyModel:
    """Step time from the model's FLOPs and bytes, the GPU's datasheet figures and a
    calibration fitted on public measurements (cpsim/calibration.py, docs/latency-model.md):
    for hardware without a profile.

    Per layer and GPU (each holds 1/tp of every layer and 1/pp of the layers): the linear
    layers' 2 x active params FLOPs per token at the calibrated FLOP fraction, joined with
    their weight reads at the calibrated bandwidth fraction (a soft max: measured GEMMs bend
    between compute- and memory-bound); attention as separate kernels, added: a prefill
    chunk of c tokens after p tokens of context computes 4 x hidden x (c^2/2 + c*p) FLOPs, a
    decode token reads its context's KV; two all-reduces of the step's activations (measured
    latency and bandwidth at the group's TP); and the engine's fixed cost per layer, growing
    with log2(tp). Per step: the engine's fixed cost (prefill or decode) and per sequence.

    Pipeline parallelism, as stage-pipelined steps: a step advances every scheduled sequence
    once; its sequences are split into m = min(pp, sequences) micro-batches that follow each
    other through the pp stages, so in steady state a step costs pp stage-times of one
    micro-batch (pp x stage(batch / m)) plus (pp - 1) activation hand-offs on its critical
    path. A lone sequence (m = 1) thus costs the whole model's time; pp micro-batches fill
    the pipeline. A hand-off is one GPU sending to the next stage's, at the calibration's
    measured send/recv cost: within a node, or across nodes where the stages, placed in
    order on nodes of ``gpus_per_node`` GPUs, reach the next node.

    MoE: the routed experts' weights are sharded over max(tp, ep) GPUs, and a step reads only
    the experts its tokens reach: with k of E experts per token, n tokens reach a fraction
    1 - (1 - k/E)^n of them (uniform routing), so a small decode step reads a fraction of
    the weights. With ep <= tp the experts stay in the TP group and its all-reduce sums
    their outputs, as for a dense layer. With ep > tp the replica is one of ep / tp
    data-parallel ranks of a wide-EP engine (vLLM's DP attention with EP): its experts see
    the tokens of all ranks, and each MoE layer dispatches its tokens to their experts and
    combines them back (tokens x k x hidden x 2 bytes per TP rank each way) at the
    calibration's measured all-to-all cost for ep, in place of the MoE's all-reduce."""

    def __init__(
        self,
        model: ModelSpec | str,
        gpu: GPUSpec | str,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        calibration: Calibration | str | None = None,
        link_latency_s: float = NOMINAL_LINK_LATENCY_S,
        max_num_batched_tokens: int = 8192,
        gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
        expert_parallel_size: int = 1,
    ) -> None:
        self.model = load_model_spec(model) if isinstance(model, str) else model
        self.gpu = load_gpu_spec(gpu) if isinstance(gpu, str) else gpu
        check_positive("tensor_parallel_size", tensor_parallel_size, integer=True)
        check_positive("pipeline_parallel_size", pipeline_parallel_size, integer=True)
        check_non_negative("link_latency_s", link_latency_s)
        check_positive("gpus_per_node", gpus_per_node, integer=True)
        check_positive("expert_parallel_size", expert_parallel_size, integer=True)
        if expert_parallel_size > 1 and not self.model.is_moe:
            raise ValueError(
                f"expert_parallel_size={expert_parallel_size} needs a mixture-of-experts "
                f"model; {self.model.name} is dense: allowed 1"
            )
        if expert_parallel_size > self.model.num_experts:
            raise ValueError(
                f"expert_parallel_size={expert_parallel_size} exceeds the "
                f"{self.model.num_experts} experts of {self.model.name}; allowed: 1 to "
                f"{self.model.num_experts}"
            )
        if pipeline_parallel_size > self.model.num_layers:
            raise ValueError(
                f"pipeline_parallel_size={pipeline_parallel_size} exceeds the "
                f"{self.model.num_layers} layers of {self.model.name}"
            )
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.expert_parallel_size = expert_parallel_size
        self.max_num_batched_tokens = max_num_batched_tokens
        if isinstance(calibration, str):
            calibration = load_calibration(calibration)
        own = calibration_for_gpu(self.gpu.name) if calibration is None else calibration
        self.calibration = own or load_calibration(FALLBACK_CALIBRATION)
        self.calibration_note = (
            f"calibration {self.calibration.name}"
            if own is not None
            else f"no calibration for {self.gpu.name}: {FALLBACK_CALIBRATION}'s fractions and "
            "fixed costs with its datasheet peak, bandwidth and link"
        )
        # the serving path the simulated replica adds around the steps (frontend_costs_s)
        self.frontend_request_s = self.calibration.frontend_request_s
        self.frontend_stream_s = self.calibration.frontend_stream_s
        all_reduce = None if own is None else own.all_reduce_at(tensor_parallel_size)
        self.all_reduce = all_reduce or nominal_all_reduce(self.gpu, max(2, tensor_parallel_size))
        measured = {} if own is None else own.send_recv
        nominal = {
            "intra_node": LinkCost(link_latency_s, self.gpu.link_bytes_s_per_direction),
            "inter_node": LinkCost(link_latency_s, NOMINAL_NODE_NETWORK_BYTES_S),
        }
        self.send_recv = nominal | measured
        self.gpus_per_node = gpus_per_node
        # stage boundaries that reach the next node (stage i holds GPUs i*tp .. i*tp + tp - 1)
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        self.inter_node_handoffs = sum(
            (i * tp - 1) // gpus_per_node != (i * tp) // gpus_per_node for i in range(1, pp)
        )
        # the all-to-all of an EP group wider than the TP group: measured, else the datasheet
        # link within a node and a 200 Gb/s NIC beyond it
        ep = expert_parallel_size
        measured_a2a = None if own is None else own.all_to_all_at(ep)
        self.all_to_all = measured_a2a or (
            self.send_recv["intra_node"] if ep <= gpus_per_node else self.send_recv["inter_node"]
        )
        self.dispatches = ep > tp
        # the weights and FLOPs of routed experts apart from the rest (attention, embeddings)
        spec = self.model
        expert_params = expert_param_count(spec)
        self._expert_bytes = expert_params * spec.bytes_per_param
        self._dense_bytes = spec.weight_bytes - self._expert_bytes
        self._expert_active = expert_params * spec.num_experts_per_token / spec.num_experts
        self._dense_active = spec.active_params - self._expert_active
        self._expert_shards = max(tp, ep)
        self._routed_per_token = max(1.0, ep / tp)  # tokens of every DP rank reach its experts
        # per-GPU rates and per-layer constants, computed once: the simulator prices every step
        cal = self.calibration
        self._flops_s = self.gpu.peak_flops * cal.flop_fraction_at(tp)
        self._bytes_s = self.gpu.memory_bandwidth_bytes_s * cal.bandwidth_fraction
        self._layer_overhead_s = cal.layer_s + cal.layer_s_per_tp_doubling * math.log2(tp)

    def stage_cost(self, batch: StepBatch, num_micro_batches: int = 1) -> StageCost:
        """Cost of one stage for one of ``num_micro_batches`` equal parts of ``batch``."""
        m = float(num_micro_batches)
        spec, tp, pp = self.model, self.tensor_parallel_size, self.pipeline_parallel_size
        layers = spec.num_layers / pp
        prefill_tokens = batch.num_prefill_tokens / m
        decode_seqs = batch.num_decode_seqs / m
        tokens = prefill_tokens + decode_seqs
        mean_context = batch.prefill_context_tokens / max(1, batch.num_prefill_seqs)
        pairs = batch.sum_sq_prefill_tokens / 2.0 / m + prefill_tokens * mean_context
        # per GPU: 1/tp of each layer (1/max(tp, ep) of the experts), 1/pp of the layers
        routed = tokens * self._routed_per_token
        shards = self._expert_shards
        linear_flops = (
            2.0 * (self._dense_active * tokens / tp + self._expert_active * routed / shards) / pp
        )
        attention_flops = 4.0 * layers * spec.hidden_size * pairs / tp
        working_set_flops = (
            self.calibration.token_sq_factor * layers * spec.hidden_size * tokens**2 / tp
        )
        weight_bytes = (
            self._dense_bytes / tp + self._expert_bytes * self.reached(routed) / shards
        ) / pp
        kv_tokens = (batch.decode_context_tokens + batch.prefill_context_tokens) / m + tokens
        kv_bytes = spec.kv_bytes_per_token() * kv_tokens / (tp * pp)
        comm_s = 0.0
        message = tokens * spec.hidden_size * ACTIVATION_BYTES
        if tp > 1:  # after attention and after the MLP (the MoE's when its experts are in TP)
            comm_s = (1.0 if self.dispatches else 2.0) * layers * self.all_reduce.time_s(message)
        if self.dispatches:  # dispatch and combine: k copies of its share of the tokens
            sent = message * spec.num_experts_per_token / tp
            comm_s += 2.0 * layers * self.all_to_all.time_s(sent)
        return StageCost(
            compute_s=linear_flops / self._flops_s,
            memory_s=weight_bytes / self._bytes_s,
            attention_s=(attention_flops + working_set_flops) / self._flops_s
            + kv_bytes / self._bytes_s,
            comm_s=comm_s,
            overhead_s=layers * self._layer_overhead_s,
            overlap_exponent=self.calibration.overlap_exponent,
        )

    def reached(self, tokens: float) -> float:
        """The fraction of a layer's experts that ``tokens`` routed tokens reach (1 for a
        dense model, whose one MLP every token uses)."""
        spec = self.model
        if not spec.is_moe:
            return 1.0
        miss: float = (1.0 - spec.num_experts_per_token / spec.num_experts) ** tokens
        return 1.0 - miss

    def step_time_s(self, batch: StepBatch) -> float:
        if batch.num_prefill_tokens == 0 and batch.num_decode_seqs == 0:
            return 0.0
        cal, pp = self.calibration, self.pipeline_parallel_size
        seqs = batch.num_prefill_seqs + batch.num_decode_seqs
        micro = max(1, min(pp, seqs))
        stage = self.stage_cost(batch, micro)
        fixed_s = cal.prefill_step_s if batch.num_prefill_tokens else cal.decode_step_s
        time_s = fixed_s + cal.seq_s * seqs + pp * stage.time_s
        if pp > 1:
            tokens = (batch.num_prefill_tokens + batch.num_decode_seqs) / micro
            handoff_bytes = tokens * self.model.hidden_size * ACTIVATION_BYTES
            inter = self.inter_node_handoffs
            time_s += (pp - 1 - inter) * self.send_recv["intra_node"].time_s(handoff_bytes)
            time_s += inter * self.send_recv["inter_node"].time_s(handoff_bytes)
        return time_s

    def predict(self, request: RequestView, instance: InstanceView) -> LatencyEstimate:
        return predict_from_steps(self, request, instance, self.max_num_batched_tokens)

    def __repr__(self) -> str:
        return (
            f"RooflineLatencyModel({self.model.name!r}, {self.gpu.name!r}, "
            f"tp={self.tensor_parallel_size}, pp={self.pipeline_parallel_size}, "
            f"ep={self.expert_parallel_size}, gpus_per_node={self.gpus_per_node}, "
            f"calibration={self.calibration.name!r})"
        )
