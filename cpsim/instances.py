"""An instance's state inside the control plane: exact in-flight accounting plus scraped metrics."""

from __future__ import annotations

from cpsim.outliers import OutlierConfig, OutlierState
from cpsim.requests import RequestState
from cpsim.types import ExecutionInstance, ExecutionInstanceType
from cpsim.views import InstanceSnapshot, InstanceView, Phase, new_namedtuple

#: Weight of the newest sample in the recent TTFT/TPOT moving averages.
EWMA_ALPHA = 0.2


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_ALPHA * (sample - old)



_Head = tuple[str, str, ExecutionInstanceType]
_Tail = tuple[int, int, int, int, int, str, float, float]


class InstanceState:
    """Owned by the control plane. Cost is shared among the requests on the instance:
    ``cost_share_s`` integrates 1/in_flight over busy time, so a request's share of the
    instance's cost is rate x (share at release - share at admission), and the shares of
    all requests add up to the instance's busy cost exactly."""

    __slots__ = (
        "_adapters",
        "_changed",
        "_cost_per_s",
        "_head",
        "_max_concurrent",
        "_tail",
        "_view",
        "busy_s",
        "cost_share_s",
        "gpu_memory_total_gb",
        "in_flight",
        "incoming",
        "instance",
        "kv_cache_usage_frac",
        "last_change_s",
        "num_running",
        "num_waiting",
        "outliers",
        "pending_prefill_tokens",
        "recent_latency_ms",
        "recent_tpot_ms",
        "recent_ttft_ms",
        "registered_s",
    )

    def __init__(
        self,
        instance: ExecutionInstance,
        now: float,
        changed: set[str] | None = None,
        outcome_window: int = 20,
    ) -> None:
        """``changed``: a set the instance id is added to whenever its view changes (the
        control plane refreshes only those views before a dispatch pass).
        ``outcome_window``: how many recent outcomes the error rate is over."""
        self.instance = instance
        self._changed = changed
        # The static description, read once: ExecutionInstance documents everything but
        # its load and health as fixed (register the instance again to change it).
        i = instance
        self._head: _Head = (i.instance_id, i.model_name, i.instance_type)
        self._max_concurrent = i.max_concurrent_requests
        self._tail: _Tail = (
            i.tensor_parallel_size,
            i.pipeline_parallel_size,
            i.data_parallel_size,
            i.expert_parallel_size,
            i.num_gpus,
            i.gpu_type,
            i.gpu_memory_gb,
            i.cost_per_gpu_hour,
        )
        self._adapters = i.lora_adapters
        self._cost_per_s = i.cost_per_hour / 3600.0
        self.gpu_memory_total_gb = i.gpu_memory_gb * i.num_gpus
        self.in_flight: dict[str, RequestState] = {}
        #: requests migrating here (their KV on its way): they hold a slot, not yet a share
        self.incoming: set[str] = set()
        self.pending_prefill_tokens = 0
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage_frac = 0.0
        self.recent_ttft_ms: float | None = None
        self.recent_tpot_ms: float | None = None
        self.recent_latency_ms: float | None = None
        self.registered_s = now
        self.last_change_s = now
        self.busy_s = 0.0
        self.cost_share_s = 0.0
        self.outliers = OutlierState(outcome_window)
        self._view: InstanceView | None = None

    def _touch(self) -> None:
        self._view = None
        if self._changed is not None:
            self._changed.add(self.instance.instance_id)

    # -- accounting -------------------------------------------------------------
    def _advance(self, now: float) -> None:
        n = len(self.in_flight)
        if n and now > self.last_change_s:
            dt = now - self.last_change_s
            self.busy_s += dt
            self.cost_share_s += dt / n
        self.last_change_s = max(self.last_change_s, now)

    def admit(self, req: RequestState, now: float) -> None:
        self._advance(now)
        self.in_flight[req.view.request_id] = req
        req.cost_share_start = self.cost_share_s
        if req.phase is not Phase.DECODE and req.first_token_s is None:
            req.prefill_pending = True
            self.pending_prefill_tokens += req.view.num_prompt_tokens
        self._touch()

    def release(self, req: RequestState, now: float) -> None:
        if req.view.request_id not in self.in_flight:
            return
        self._advance(now)
        del self.in_flight[req.view.request_id]
        req.cost_usd += self._cost_per_s * (self.cost_share_s - req.cost_share_start)
        self._clear_prefill(req)
        if (
            req.first_token_s is not None
            and req.num_output_tokens > 1
            and req.phase is not Phase.PREFILL
        ):
            start = req.first_token_s
            self.recent_tpot_ms = _ewma(
                self.recent_tpot_ms, 1000.0 * (now - start) / (req.num_output_tokens - 1)
            )
        self._touch()

    def on_first_token(self, req: RequestState, now: float) -> None:
        self._clear_prefill(req)
        start = req.dispatch_s if req.dispatch_s is not None else req.view.arrival_s
        self.recent_ttft_ms = _ewma(self.recent_ttft_ms, 1000.0 * (now - start))
        self._touch()

    def on_complete(self, req: RequestState, now: float) -> None:
        self.recent_latency_ms = _ewma(self.recent_latency_ms, 1000.0 * (now - req.view.arrival_s))

    def _clear_prefill(self, req: RequestState) -> None:
        if req.prefill_pending:
            req.prefill_pending = False
            self.pending_prefill_tokens -= req.view.num_prompt_tokens

    def apply(self, snap: InstanceSnapshot, now: float) -> None:
        """Take the scraped fields (those not None); the view is rebuilt only on a change."""
        running, waiting, kv, healthy = (
            snap.num_running, snap.num_waiting, snap.kv_cache_usage_frac, snap.is_healthy
        )
        changed = False
        if running is not None and running != self.num_running:
            self.num_running, changed = running, True
        if waiting is not None and waiting != self.num_waiting:
            self.num_waiting, changed = waiting, True
        if kv is not None and kv != self.kv_cache_usage_frac:
            self.kv_cache_usage_frac, changed = kv, True
        if healthy is not None and healthy != self.instance.is_healthy:
            self.instance.is_healthy, changed = healthy, True
        if changed:
            self._touch()

    def record_outcome(self, failed: bool, now: float, config: OutlierConfig) -> str | None:
        """Count a request's outcome here; returns why the instance should be ejected, or
        None (``OutlierState.record``)."""
        reason = self.outliers.record(failed, now, config)
        self._touch()  # the error rate is in the view
        return reason

    def age_outcomes(self, now: float, window_s: float) -> None:
        if self.outliers.age(now, window_s):
            self._touch()

    def end_ejection(self) -> None:
        """Back from an ejection, on probation, with a clean error rate."""
        self.outliers.start_probation()
        self._touch()

    def set_health(self, healthy: bool) -> None:
        self.instance.is_healthy = healthy
        self._touch()

    def busy_frac(self, now: float) -> float:
        self._advance(now)
        span = now - self.registered_s
        return self.busy_s / span if span > 0 else 0.0

    def load_frac(self) -> float:
        return (len(self.in_flight) + len(self.incoming)) / self._max_concurrent

    def has_capacity(self) -> bool:
        """``InstanceView.has_capacity`` of the view as it would be built now."""
        taken = len(self.in_flight) + len(self.incoming)
        return bool(self.instance.is_healthy) and taken < self._max_concurrent

    def reserve(self, request_id: str) -> None:
        """A slot for a request migrating here, until it arrives or the migration ends."""
        self.incoming.add(request_id)
        self._touch()

    def unreserve(self, request_id: str) -> None:
        if request_id in self.incoming:
            self.incoming.discard(request_id)
            self._touch()

    # -- what policies see -------------------------------------------------------
    def view(self) -> InstanceView:
        view = self._view
        if view is None:
            n = len(self.in_flight) + len(self.incoming)
            instance = self.instance
            head, tail = self._head, self._tail
            view = self._view = new_namedtuple(  # rebuilt ~3 times a request
                InstanceView,
                (
                    head[0],
                    head[1],
                    head[2],
                    instance.is_healthy,
                    n,
                    self.pending_prefill_tokens,
                    self._max_concurrent,
                    self.num_running,
                    self.num_waiting,
                    self.kv_cache_usage_frac,
                    tail[0],
                    tail[1],
                    tail[2],
                    tail[3],
                    tail[4],
                    tail[5],
                    tail[6],
                    tail[7],
                    self.recent_ttft_ms,
                    self.recent_tpot_ms,
                    self.outliers.error_rate,
                    self._adapters,
                ),
            )
        return view
