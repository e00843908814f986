"""The seed API's vocabulary: requests, instances, their configs, and run-level metrics."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from cpsim.validation import check_choice, check_non_negative, check_positive, check_range

E = TypeVar("E", bound=enum.Enum)

#: Characters per token used to estimate ``num_prompt_tokens`` from text when no
#: tokenizer is at hand (English BPE vocabularies average about four).
CHARS_PER_TOKEN_ESTIMATE = 4


class RequestPriority(enum.IntEnum):
    """Lower value = more urgent, so sorting by priority puts CRITICAL first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    def __str__(self) -> str:  # "RequestPriority.HIGH", not "1"
        return f"RequestPriority.{self.name}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class RequestStatus(enum.IntEnum):
    """Lifecycle states, ordered so that ``status >= COMPLETED`` means finished."""

    PENDING = 0
    QUEUED = 1
    RUNNING = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5
    REJECTED = 6

    @property
    def is_terminal(self) -> bool:
        return self >= RequestStatus.COMPLETED

    def __str__(self) -> str:  # "RequestStatus.RUNNING", as the seed prints it, not "2"
        return f"RequestStatus.{self.name}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class ExecutionInstanceType(enum.Enum):
    GENERAL = "general"
    PREFILLING = "prefilling"
    DECODING = "decoding"


class ParallelismType(enum.Enum):
    """``TP``, ``PP``, ``DP`` and ``EP`` are aliases (the seed writes ``ParallelismType.TP``):
    the same members, so ``ParallelismType.TP is ParallelismType.TENSOR_PARALLEL``."""

    TENSOR_PARALLEL = "tensor_parallel"
    PIPELINE_PARALLEL = "pipeline_parallel"
    DATA_PARALLEL = "data_parallel"
    EXPERT_PARALLEL = "expert_parallel"
    HYBRID = "hybrid"
    TP = "tensor_parallel"
    PP = "pipeline_parallel"
    DP = "data_parallel"
    EP = "expert_parallel"


def coerce_enum(cls: type[E], value: Any, field_name: str) -> E:
    """Accept an enum member, its name (any case) or its value; else a clear ValueError."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        key = value.strip().upper()
        if key in cls.__members__:
            return cls.__members__[key]
    for member in cls:
        if member.value == value:
            return member
    allowed = ", ".join(m.name.lower() for m in cls)
    raise ValueError(f"{field_name}={value!r} is not one of: {allowed}")


#: Tokens per id of ``RequestMetadata.prefix_block_ids`` unless a request says otherwise.
DEFAULT_PREFIX_BLOCK_SIZE_TOKENS: Final = 512


@dataclass(frozen=True, slots=True)
class RequestMetadata:
    """What an application submits. ``num_prompt_tokens`` is derived from the token ids,
    or estimated from ``prompt`` text, when not given.

    ``prefix_block_ids`` carries a trace's prompt-block ids (Mooncake ``hash_ids``): equal
    ids at equal positions mean an equal prompt prefix, each id covering
    ``prefix_block_size_tokens`` tokens.
    """

    request_id: str
    user_id: str = "anonymous"
    priority: RequestPriority = RequestPriority.NORMAL
    slo_deadline_ms: float | None = None
    max_tokens: int = 256
    model_name: str | None = None
    cost_budget: float | None = None
    parallelism_hint: ParallelismType | None = None
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    num_prompt_tokens: int | None = None
    prefix_block_ids: tuple[int, ...] | None = None
    prefix_block_size_tokens: int = DEFAULT_PREFIX_BLOCK_SIZE_TOKENS

    def __post_init__(self) -> None:
        # Fast paths first: workloads build millions of these, almost always well-formed.
        setattr_ = object.__setattr__
        if type(self.request_id) is not str or not self.request_id:
            raise ValueError(f"request_id={self.request_id!r} must be a non-empty string")
        if type(self.priority) is not RequestPriority:
            setattr_(self, "priority", coerce_enum(RequestPriority, self.priority, "priority"))
        if self.parallelism_hint is not None and type(self.parallelism_hint) is not ParallelismType:
            hint = coerce_enum(ParallelismType, self.parallelism_hint, "parallelism_hint")
            setattr_(self, "parallelism_hint", hint)
        slo = self.slo_deadline_ms
        if slo is not None and not (type(slo) in (int, float) and slo > 0):
            check_positive("slo_deadline_ms", slo)
        if not (type(self.max_tokens) is int and self.max_tokens > 0):
            check_positive("max_tokens", self.max_tokens, integer=True)
        if self.cost_budget is not None:
            check_non_negative("cost_budget", self.cost_budget)
        if self.prompt_token_ids is not None and type(self.prompt_token_ids) is not tuple:
            setattr_(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if self.prefix_block_ids is not None and type(self.prefix_block_ids) is not tuple:
            setattr_(self, "prefix_block_ids", tuple(self.prefix_block_ids))
        if self.prefix_block_size_tokens != DEFAULT_PREFIX_BLOCK_SIZE_TOKENS:
            check_positive("prefix_block_size_tokens", self.prefix_block_size_tokens, integer=True)
        given = self.num_prompt_tokens
        if type(given) is int and given >= 0 and self.prompt_token_ids is None:
            return  # the common case: a count and no ids to check it against
        setattr_(self, "num_prompt_tokens", self._derive_num_prompt_tokens())

    def _derive_num_prompt_tokens(self) -> int:
        given = self.num_prompt_tokens
        if given is not None:
            check_non_negative("num_prompt_tokens", given, integer=True)
            ids = self.prompt_token_ids
            if ids is not None and len(ids) != given:
                raise ValueError(
                    f"num_prompt_tokens={given} disagrees with len(prompt_token_ids)={len(ids)}"
                )
            return int(given)
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        if self.prompt is not None:
            return max(1, math.ceil(len(self.prompt) / CHARS_PER_TOKEN_ESTIMATE))
        if self.prefix_block_ids is not None:
            return len(self.prefix_block_ids) * self.prefix_block_size_tokens
        return 0

    @property
    def prompt_tokens(self) -> int:
        """``num_prompt_tokens`` as a plain int (always set after construction)."""
        return int(self.num_prompt_tokens or 0)


#: vLLM's default ``max_num_seqs``: an instance's sequence limit when its configs set none.
DEFAULT_MAX_NUM_SEQS: Final = 256
DEFAULT_GPUS_PER_NODE: Final = 8  # an HGX / DGX node


@dataclass(frozen=True, slots=True)
class PrefillingConfig:
    """Engine settings of a prefill-serving instance.

    The seed's fields come first, in its order: ``target_batch_size`` is the most sequences
    the engine batches (vLLM's ``max_num_seqs``; None: vLLM's default, 256);
    ``tensor_parallel_size``, when given, must equal the instance's (None: the instance's);
    ``enable_chunked_prefill`` as vLLM's. The rest are further vLLM scheduler knobs."""

    target_batch_size: int | None = None
    tensor_parallel_size: int | None = None
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int = 8192
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.target_batch_size is not None:
            check_positive("target_batch_size", self.target_batch_size, integer=True)
        if self.tensor_parallel_size is not None:
            check_positive("tensor_parallel_size", self.tensor_parallel_size, integer=True)
        check_positive("max_num_batched_tokens", self.max_num_batched_tokens, integer=True)
        check_non_negative(
            "long_prefill_token_threshold", self.long_prefill_token_threshold, integer=True
        )


@dataclass(frozen=True, slots=True)
class DecodingConfig:
    """Engine settings of a decode-serving instance.

    The seed's fields come first, in its order: ``target_latency_ms`` is the TPOT the
    instance should keep (the control plane sends no new decode to it while its predicted
    TPOT is above this and another candidate's is not; None: no target);
    ``max_parallel_requests`` is the most sequences the engine runs at once (vLLM's
    ``max_num_seqs``; None: vLLM's default, 256). The rest are further vLLM knobs."""

    target_latency_ms: float | None = None
    max_parallel_requests: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.target_latency_ms is not None:
            check_positive("target_latency_ms", self.target_latency_ms)
        if self.max_parallel_requests is not None:
            check_positive("max_parallel_requests", self.max_parallel_requests, integer=True)
        check_positive("block_size", self.block_size, integer=True)


PD_ROUTING_POLICIES = ("threshold", "adaptive")


@dataclass(frozen=True, slots=True)
class PDSeparationConfig:
    """Prefill/decode disaggregation: prompts of at least ``prefilling_threshold_input_tokens``
    prefill on a PREFILLING instance and decode on a DECODING one.

    ``adaptive`` moves the threshold within [min, max] by ``adaptive_step_tokens`` towards the
    less loaded pool, with ``adaptive_hysteresis`` of relative load before it moves.
    """

    enabled: bool = False
    routing_policy: str = "threshold"
    prefilling_threshold_input_tokens: int = 800
    min_threshold_input_tokens: int = 128
    max_threshold_input_tokens: int = 8192
    adaptive_step_tokens: int = 64
    adaptive_hysteresis: float = 0.2
    kv_transfer_bandwidth_gbps: float = 100.0
    kv_transfer_latency_ms: float = 1.0

    def __post_init__(self) -> None:
        check_choice("routing_policy", self.routing_policy, PD_ROUTING_POLICIES)
        check_non_negative(
            "prefilling_threshold_input_tokens",
            self.prefilling_threshold_input_tokens,
            integer=True,
        )
        check_non_negative(
            "min_threshold_input_tokens", self.min_threshold_input_tokens, integer=True
        )
        if self.max_threshold_input_tokens < self.min_threshold_input_tokens:
            raise ValueError(
                f"max_threshold_input_tokens={self.max_threshold_input_tokens} must be >= "
                f"min_threshold_input_tokens={self.min_threshold_input_tokens}"
            )
        check_positive("adaptive_step_tokens", self.adaptive_step_tokens, integer=True)
        check_range("adaptive_hysteresis", self.adaptive_hysteresis, 0.0, 1.0)
        check_positive("kv_transfer_bandwidth_gbps", self.kv_transfer_bandwidth_gbps)
        check_non_negative("kv_transfer_latency_ms", self.kv_transfer_latency_ms)


@dataclass(slots=True)
class ExecutionInstance:
    """An engine instance (one vLLM server or engine) the control plane can route to.

    ``current_load`` (fraction of ``max_concurrent_requests`` in flight, set when the
    control plane lists its instances: ``get_instances``) and ``is_healthy`` are live
    fields, kept up to date by the control plane; the rest is static description.
    ``gpu_count`` defaults to tp x pp x dp.
    """

    instance_id: str
    host: str = "localhost"
    port: int = 8000
    model_name: str = "default"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel_size: int = 1
    gpu_count: int | None = None
    gpu_memory_gb: float = 80.0
    gpu_type: str = "A100-80GB"
    cost_per_gpu_hour: float = 2.0
    max_concurrent_requests: int = 256
    instance_type: ExecutionInstanceType = ExecutionInstanceType.GENERAL
    prefilling_config: PrefillingConfig | None = None
    decoding_config: DecodingConfig | None = None
    current_load: float = 0.0
    is_healthy: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.instance_id, str) or not self.instance_id:
            raise ValueError(f"instance_id={self.instance_id!r} must be a non-empty string")
        for name in (
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "expert_parallel_size",
            "max_concurrent_requests",
        ):
            check_positive(name, getattr(self, name), integer=True)
        check_range("port", self.port, 0, 65535)
        check_positive("gpu_memory_gb", self.gpu_memory_gb)
        check_non_negative("cost_per_gpu_hour", self.cost_per_gpu_hour)
        self.instance_type = coerce_enum(ExecutionInstanceType, self.instance_type, "instance_type")
        model_parallel = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.gpu_count is None:
            self.gpu_count = model_parallel * self.data_parallel_size
        check_positive("gpu_count", self.gpu_count, integer=True)
        if self.gpu_count < model_parallel:
            raise ValueError(
                f"gpu_count={self.gpu_count} is smaller than tensor_parallel_size x "
                f"pipeline_parallel_size = {model_parallel}; allowed: gpu_count >= {model_parallel}"
            )
        if self.prefilling_config is None:
            self.prefilling_config = PrefillingConfig()
        if self.decoding_config is None:
            self.decoding_config = DecodingConfig()
        if "gpus_per_node" in self.metadata:
            check_positive("gpus_per_node", self.metadata["gpus_per_node"], integer=True)
        prefill_tp = self.prefilling_config.tensor_parallel_size
        if prefill_tp is not None and prefill_tp != self.tensor_parallel_size:
            raise ValueError(
                f"prefilling_config.tensor_parallel_size={prefill_tp} disagrees with the "
                f"instance's tensor_parallel_size={self.tensor_parallel_size} "
                f"(instance_id={self.instance_id!r}); allowed: {self.tensor_parallel_size} "
                f"or None"
            )

    @property
    def lora_adapters(self) -> frozenset[str]:
        """The LoRA adapters it serves beside its model (``metadata["lora_adapters"]``):
        requests naming one as their model may run here."""
        return frozenset(str(a) for a in self.metadata.get("lora_adapters") or ())

    @property
    def gpus_per_node(self) -> int:
        """GPUs per node where it runs (``metadata["gpus_per_node"]``, default 8): its
        pipeline stages, placed in order, cross to the next node at that boundary."""
        return int(self.metadata.get("gpus_per_node", DEFAULT_GPUS_PER_NODE))

    @property
    def max_num_seqs(self) -> int:
        """The engine's sequence limit (vLLM's ``max_num_seqs``): the prefilling config's
        ``target_batch_size`` on a PREFILLING instance, the decoding config's
        ``max_parallel_requests`` on a DECODING one (each falling back on the other), the
        smaller of those given on a GENERAL one; 256 when none is; never above
        ``max_concurrent_requests``."""
        assert self.prefilling_config is not None and self.decoding_config is not None
        batch = self.prefilling_config.target_batch_size
        parallel = self.decoding_config.max_parallel_requests
        if self.instance_type is ExecutionInstanceType.PREFILLING:
            limit = batch if batch is not None else parallel
        elif self.instance_type is ExecutionInstanceType.DECODING:
            limit = parallel if parallel is not None else batch
        else:
            given = [n for n in (batch, parallel) if n is not None]
            limit = min(given) if given else None
        if limit is None:
            limit = DEFAULT_MAX_NUM_SEQS
        return min(limit, self.max_concurrent_requests)

    @property
    def target_tpot_ms(self) -> float | None:
        """The decoding config's ``target_latency_ms`` (None: no target)."""
        assert self.decoding_config is not None
        return self.decoding_config.target_latency_ms

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def num_gpus(self) -> int:
        return int(self.gpu_count or 1)

    @property
    def cost_per_hour(self) -> float:
        return self.cost_per_gpu_hour * self.num_gpus


@dataclass(frozen=True, slots=True)
class PerformanceMetrics:
    """Run-level summary; latencies in milliseconds, rates per second of the window."""

    total_requests: int = 0
    completed_requests: int = 0
    failed_requests: int = 0
    cancelled_requests: int = 0
    rejected_requests: int = 0
    active_requests: int = 0
    queued_requests: int = 0
    avg_latency_ms: float = 0.0
    p50_latency_ms: float = 0.0
    p95_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0
    avg_ttft_ms: float = 0.0
    p50_ttft_ms: float = 0.0
    p95_ttft_ms: float = 0.0
    p99_ttft_ms: float = 0.0
    avg_tpot_ms: float = 0.0
    p50_tpot_ms: float = 0.0
    p95_tpot_ms: float = 0.0
    p99_tpot_ms: float = 0.0
    throughput_tokens_per_s: float = 0.0
    throughput_requests_per_s: float = 0.0
    slo_violations: int = 0
    slo_compliance_rate: float = 1.0
    goodput_requests_per_s: float = 0.0
    avg_gpu_utilization: float = 0.0
    used_gpu_memory_gb: float = 0.0
    total_cost_usd: float = 0.0
    cost_per_token: float = 0.0
    window_s: float = 0.0
    #: The same summary per model, when the requests asked for (or ran on) more than one.
    models: dict[str, PerformanceMetrics] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.throughput_tokens_per_s

    @property
    def requests_per_second(self) -> float:
        return self.throughput_requests_per_s

    def as_dict(self) -> dict[str, float]:
        """The scalar fields (``models`` left out: each of its values has its own)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "models"}
