"""Frozen snapshots policies see: a request, an instance, and what a backend reports.

RequestView, InstanceView and InstanceSnapshot are NamedTuples rather than frozen
dataclasses: the control plane builds them on every dispatch (and a simulation takes a
snapshot per instance per scrape), and a 20-field NamedTuple is built about ten times
faster (0.5 us against 4.8 us measured here).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from cpsim.types import (
    ExecutionInstanceType,
    ParallelismType,
    RequestMetadata,
    RequestPriority,
)

#: ``new_namedtuple(Cls, (every field, in order))`` builds a NamedTuple without its generated
#: ``__new__``, a Python function several times dearer to call from compiled code. The
#: simulator's hot path builds its views, step plans and outcomes this way.
new_namedtuple = tuple.__new__


class Phase(enum.Enum):
    """What a dispatch asks an instance to do."""

    FULL = "full"  # prefill and decode on one instance
    PREFILL = "prefill"  # prefill (and the first token) only; the KV cache is handed off
    DECODE = "decode"  # continue from a KV cache handed off by a prefill instance


class RequestView(NamedTuple):
    """A queued request as policies see it. Times in seconds of the driver's clock."""

    request_id: str
    user_id: str
    priority: RequestPriority
    arrival_s: float
    num_prompt_tokens: int
    max_tokens: int
    slo_deadline_ms: float | None
    cost_budget: float | None
    model_name: str | None
    parallelism_hint: ParallelismType | None
    meta: RequestMetadata
    seq: int  # arrival order, unique per control plane

    @classmethod
    def of(cls, meta: RequestMetadata, arrival_s: float, seq: int) -> RequestView:
        return new_namedtuple(
            cls,
            (
                meta.request_id,
                meta.user_id,
                meta.priority,
                arrival_s,
                meta.prompt_tokens,
                meta.max_tokens,
                meta.slo_deadline_ms,
                meta.cost_budget,
                meta.model_name,
                meta.parallelism_hint,
                meta,
                seq,
            ),
        )

    def deadline_s(self) -> float | None:
        """Absolute deadline on the driver's clock, or None without an SLO."""
        if self.slo_deadline_ms is None:
            return None
        return self.arrival_s + self.slo_deadline_ms / 1000.0


class InstanceSnapshot(NamedTuple):
    """What a backend observed of an engine at ``time_s`` (live: vLLM's /metrics; sim: the
    replica, on the same scrape interval). Fields a backend cannot observe stay None.
    (A NamedTuple, as the views: a simulation takes one per instance per scrape.)"""

    instance_id: str
    time_s: float
    num_running: int | None = None
    num_waiting: int | None = None
    kv_cache_usage_frac: float | None = None
    prefix_cache_hit_rate: float | None = None
    gpu_utilization_frac: float | None = None
    is_healthy: bool | None = None


class InstanceView(NamedTuple):
    """An instance as policies see it: static description, the control plane's exact
    in-flight accounting, and the last scraped engine state."""

    instance_id: str
    model_name: str
    instance_type: ExecutionInstanceType
    is_healthy: bool
    in_flight: int  # dispatched by this control plane and not yet done (exact)
    pending_prefill_tokens: int  # prompt tokens of in-flight requests without a first token
    max_concurrent_requests: int
    num_running: int  # scraped
    num_waiting: int  # scraped
    kv_cache_usage_frac: float  # scraped, in [0, 1]
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    expert_parallel_size: int
    gpu_count: int
    gpu_type: str
    gpu_memory_gb: float
    cost_per_gpu_hour: float
    recent_ttft_ms: float | None  # moving average over recent completions
    recent_tpot_ms: float | None
    #: failed fraction of the instance's recent requests (``cpsim.outliers``): routers count
    #: it as load, so an instance that fails fast does not look idle
    recent_error_rate: float = 0.0
    #: the LoRA adapters it serves beside its base model (``metadata["lora_adapters"]``):
    #: a request naming one as its model may run here
    adapters: frozenset[str] = frozenset()

    def serves(self, model: str | None) -> bool:
        """Whether a request for ``model`` (None: any) may run here: the base model, or
        one of its adapters."""
        return model is None or model == self.model_name or model in self.adapters

    @property
    def load_frac(self) -> float:
        """In-flight requests over capacity, in [0, 1+]."""
        return self.in_flight / self.max_concurrent_requests

    @property
    def has_capacity(self) -> bool:
        return self.is_healthy and self.in_flight < self.max_concurrent_requests

    @property
    def outstanding(self) -> int:
        """Requests the engine holds or will hold: the larger of our count and its own."""
        return max(self.in_flight, self.num_running + self.num_waiting)

    @property
    def cost_per_hour(self) -> float:
        return self.cost_per_gpu_hour * self.gpu_count

    def parallelism_types(self) -> frozenset[ParallelismType]:
        kinds = set()
        if self.tensor_parallel_size > 1:
            kinds.add(ParallelismType.TENSOR_PARALLEL)
        if self.pipeline_parallel_size > 1:
            kinds.add(ParallelismType.PIPELINE_PARALLEL)
        if self.data_parallel_size > 1:
            kinds.add(ParallelismType.DATA_PARALLEL)
        if self.expert_parallel_size > 1:
            kinds.add(ParallelismType.EXPERT_PARALLEL)
        if len(kinds) > 1:
            kinds.add(ParallelismType.HYBRID)
        return frozenset(kinds)


class PoolView(NamedTuple):
    """What an autoscaler observes of one pool (a cluster group's instances) at ``time_s``,
    every ``interval_s``. Rates and the SLO attainment are over the last interval; the
    SLO attainment is None when no request with an SLO ended in it, ``mean_latency_s`` 0.0
    when none completed."""

    pool: str
    time_s: float
    interval_s: float
    num_ready: int  # serving
    num_starting: int  # paid for, cold-starting
    num_draining: int  # finishing what they hold, taking nothing new
    min_instances: int
    max_instances: int
    max_concurrent_per_instance: int
    queued: int  # requests waiting in the control plane
    in_flight: int  # on the pool's serving instances
    arrivals_per_s: float
    completions_per_s: float
    slo_attainment: float | None
    mean_latency_s: float

    @property
    def num_provisioned(self) -> int:
        """Instances serving or on their way (what a new target is compared with)."""
        return self.num_ready + self.num_starting

    @property
    def utilization(self) -> float:
        """Demand over capacity: requests in flight and queued over what the serving
        instances take at once (inf with none serving and some demand)."""
        capacity = self.num_ready * self.max_concurrent_per_instance
        demand = self.in_flight + self.queued
        if capacity == 0:
            return float("inf") if demand else 0.0
        return demand / capacity


class DecodeView(NamedTuple):
    """A request decoding on an instance, as a migration policy sees it: its context (prompt
    and output so far: the KV a migration copies), the tokens it has still to make, and the
    share of its instance's KV cache it holds."""

    request_id: str
    instance_id: str
    num_context_tokens: int
    num_remaining_tokens: int
    kv_frac: float
