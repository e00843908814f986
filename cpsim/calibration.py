"""Fitted coefficients of the analytical step model, per engine and GPU type.

Each file under ``cpsim/data/calibrations/`` is written by ``python -m
experiments.fit_latency_model`` from public measurements (``data/published/``): the GPU's
achieved HBM bandwidth from per-operator kernel timings, its all-reduce latency and
bandwidth by TP from collective timings, and the engine's achieved FLOP fraction and fixed
costs (per step, per layer, per sequence) from whole-step timings of a real engine, and its
point-to-point transfer cost within and between nodes (a pipeline stage's hand-off), and
its MoE all-to-all (dispatch and combine) cost by EP degree. The
file says where each number comes from and how far the fit is from the data it held out
(``docs/latency-model.md``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cpsim.datafiles import data_names, from_known_keys, read_data
from cpsim.validation import check_non_negative, check_positive, check_range

SEND_RECV_PATHS = ("intra_node", "inter_node")


@dataclass(frozen=True, slots=True)
class LinkCost:
    """One collective or transfer of a message: ``latency_s`` + bytes / ``bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def time_s(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True, slots=True)
class Calibration:
    """How one engine's steps cost on one GPU type, beyond the GPU's datasheet figures.

    - ``bandwidth_fraction``: achieved fraction of HBM bandwidth for weight and KV reads;
    - ``flop_fraction`` x tp ** -``flop_fraction_tp_exponent``: achieved fraction of peak
      FLOP/s (smaller per-GPU matrices run less efficiently as TP grows);
    - ``overlap_exponent`` p: a GEMM's time is (compute^p + memory^p)^(1/p), between their
      sum (p = 1) and their max (p large), as measured kernels bend between the two;
    - ``layer_s`` + ``layer_s_per_tp_doubling`` x log2(tp): fixed cost per layer per step
      (kernel launches, small kernels, synchronisation across the TP group);
    - ``prefill_step_s`` / ``decode_step_s``: fixed cost per step with / without prefill
      tokens (scheduling, input preparation, sampling launch); ``seq_s`` per sequence;
    - ``token_sq_factor``: a step's working set outgrowing on-chip caches, priced as
      ``token_sq_factor`` x hidden x tokens^2 FLOPs per layer and GPU;
    - ``all_reduce``: measured all-reduce cost by TP degree on the GPU's interconnect;
    - ``send_recv``: measured cost of one GPU sending to another, ``"intra_node"`` (NVLink)
      and ``"inter_node"`` (the node's network): a pipeline stage's hand-off;
    - ``all_to_all``: measured MoE dispatch / combine cost by EP degree, for the bytes one
      GPU sends (tokens x experts per token x hidden x bytes per value);
    - ``frontend_request_s`` / ``frontend_stream_s``: the engine's frontend (its API server
      process), two queues that serve one job at a time: each request's input processing
      (tokenization on one thread) before the engine core takes it, and each step's outputs
      (detokenization, the streamed chunk) at ``frontend_stream_s`` per request with a token
      before the client sees them (0: not modelled; ``cpsim.latency.frontend_costs_s``);
    - ``default``: chosen for its GPU types where an instance names no calibration (False:
      only where a cluster group's ``calibration`` names it)."""

    name: str
    gpu: str
    engine: str
    bandwidth_fraction: float
    flop_fraction: float
    flop_fraction_tp_exponent: float
    overlap_exponent: float
    layer_s: float
    layer_s_per_tp_doubling: float
    prefill_step_s: float
    decode_step_s: float
    seq_s: float
    token_sq_factor: float
    all_reduce: dict[int, LinkCost] = field(default_factory=dict)
    send_recv: dict[str, LinkCost] = field(default_factory=dict)
    all_to_all: dict[int, LinkCost] = field(default_factory=dict)
    applies_to: tuple[str, ...] = ()
    source: str = ""
    default: bool = True
    frontend_request_s: float = 0.0
    frontend_stream_s: float = 0.0

    def __post_init__(self) -> None:
        check_range("bandwidth_fraction", self.bandwidth_fraction, 0.01, 1.0)
        check_range("flop_fraction", self.flop_fraction, 0.01, 1.0)
        check_range("overlap_exponent", self.overlap_exponent, 1.0, 100.0)
        for f in (
            "layer_s",
            "prefill_step_s",
            "decode_step_s",
            "seq_s",
            "token_sq_factor",
            "flop_fraction_tp_exponent",
            "layer_s_per_tp_doubling",
            "frontend_request_s",
            "frontend_stream_s",
        ):
            check_non_negative(f, getattr(self, f))
        for tp in self.all_reduce:
            check_positive("all_reduce TP degree", tp, integer=True)
        for ep in self.all_to_all:
            check_positive("all_to_all EP degree", ep, integer=True)
        wrong = sorted(set(self.send_recv) - set(SEND_RECV_PATHS))
        if wrong:
            raise ValueError(f"send_recv paths {wrong} are unknown; allowed: {SEND_RECV_PATHS}")

    def flop_fraction_at(self, tensor_parallel_size: int) -> float:
        scale: float = float(tensor_parallel_size) ** -self.flop_fraction_tp_exponent
        return self.flop_fraction * scale

    def all_reduce_at(self, tensor_parallel_size: int) -> LinkCost | None:
        """The measured all-reduce among ``tensor_parallel_size`` GPUs (see ``_at_degree``)."""
        return _at_degree(self.all_reduce, tensor_parallel_size)

    def all_to_all_at(self, expert_parallel_size: int) -> LinkCost | None:
        """The measured dispatch / combine among ``expert_parallel_size`` GPUs."""
        return _at_degree(self.all_to_all, expert_parallel_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        data = dict(data)
        data.pop("fit", None)  # the fit's own record (data used, held-out errors): for people
        for table, key in (("all_reduce", int), ("all_to_all", int), ("send_recv", str)):
            data[table] = {
                key(k): LinkCost(float(v["latency_s"]), float(v["bytes_per_s"]))
                for k, v in (data.get(table) or {}).items()
            }
        data["applies_to"] = tuple(data.get("applies_to") or ())
        return from_known_keys(cls, data, "calibration")


def _at_degree(table: dict[int, LinkCost], degree: int) -> LinkCost | None:
    """The cost measured at this group size, else at the nearest larger measured one (a
    superset of the group's hops), else at the largest; None when nothing is measured."""
    if not table:
        return None
    larger = [n for n in table if n >= degree]
    return table[min(larger) if larger else max(table)]


def available_calibrations() -> list[str]:
    return data_names("calibrations")


@cache
def load_calibration(name: str) -> Calibration:
    """A shipped calibration by name (``vllm-a100-80gb``), or one from a JSON path."""
    return Calibration.from_dict(read_data("calibrations", name, "calibration"))


def calibration_for_gpu(gpu_name: str) -> Calibration | None:
    """The shipped default calibration measured on this GPU type (or declared to apply to
    it); others are used where an instance names them (a cluster group's ``calibration``)."""
    key = gpu_name.strip().lower()
    for name in available_calibrations():
        cal = load_calibration(name)
        if not cal.default:
            continue
        if key == cal.gpu.lower() or key in (g.lower() for g in cal.applies_to):
            return cal
    return None
