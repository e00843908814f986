"""The sans-I/O control plane: told what happened, it answers what to do. It never sleeps or awaits.

Drivers (the SimPy simulation, the asyncio manager) own the clock and the I/O; they pass
``now`` (seconds) into every call and carry out the ``Dispatch``/``Abort`` actions returned.
Every accepted request ends in exactly one terminal state; events about a request that is
already terminal (a late token after a cancel, say) are ignored.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

from cpsim.instances import InstanceState
from cpsim.latency import ObservedLatencyModel
from cpsim.metrics import MetricsCollector
from cpsim.outliers import OutlierConfig
from cpsim.protocols import (
    AdmissionPolicy,
    LatencyModel,
    LinkPolicy,
    PDPolicy,
    Router,
    SchedulingPolicy,
)
from cpsim.requests import RequestState
from cpsim.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    PerformanceMetrics,
    RequestMetadata,
    RequestStatus,
)
from cpsim.validation import check_choice, check_non_negative, check_positive
from cpsim.views import InstanceSnapshot, InstanceView, Phase, RequestView, new_namedtuple

FailureAction = Literal["requeue", "fail"]
FAILURE_ACTIONS = ("requeue", "fail")

_PHASE_TYPES: dict[Phase, tuple[ExecutionInstanceType, ...]] = {
    Phase.FULL: (ExecutionInstanceType.GENERAL, ExecutionInstanceType.DECODING),
    Phase.PREFILL: (ExecutionInstanceType.PREFILLING,),
    Phase.DECODE: (ExecutionInstanceType.DECODING, ExecutionInstanceType.GENERAL),
}


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    """Core settings. ``on_instance_failure``: what happens to a request whose instance
    fails before it produced a token ("requeue" up to ``max_attempts`` dispatches, or
    "fail"); a request that already streamed tokens always fails, as its tokens cannot be
    taken back. A retry goes to another instance than the ones that failed the request while
    one serves it (waiting for it when it is full). ``queue_timeout_s``: a request queued
    longer fails (None: never), and so does one prefilled that waits longer for a decode
    instance (its prefill instance is told to let go of its KV: ``take_aborts``).

    The retry budget (Envoy's): requests failed by an engine are retried only while at most
    max(``min_retry_concurrency``, ``retry_budget_frac`` x active requests) active requests
    are such retries, so that retries cannot multiply an outage; requests requeued because
    their instance crashed or was removed are not counted (that instance is out of routing).
    ``outliers``: when an instance that keeps failing is ejected from routing.
    ``max_records``: per-request records kept for ``summary`` and ``records`` (the most
    recent, at least this many; None: all), so that a long-running server's memory is
    bounded."""

    max_queue_len: int | None = None
    on_instance_failure: FailureAction = "requeue"
    max_attempts: int = 3
    queue_timeout_s: float | None = None
    retry_budget_frac: float = 0.2
    min_retry_concurrency: int = 3
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    max_records: int | None = None

    def __post_init__(self) -> None:
        if self.max_queue_len is not None:
            check_non_negative("max_queue_len", self.max_queue_len, integer=True)
        check_choice("on_instance_failure", self.on_instance_failure, FAILURE_ACTIONS)
        check_positive("max_attempts", self.max_attempts, integer=True)
        if self.queue_timeout_s is not None:
            check_positive("queue_timeout_s", self.queue_timeout_s)
        check_non_negative("retry_budget_frac", self.retry_budget_frac)
        check_non_negative("min_retry_concurrency", self.min_retry_concurrency, integer=True)
        if self.max_records is not None:
            check_positive("max_records", self.max_records, integer=True)
        if not isinstance(self.outliers, OutlierConfig):
            raise TypeError(
                f"outliers={self.outliers!r} is not allowed; pass an OutlierConfig"
            )


class Admission(NamedTuple):
    """The answer to an arrival: queued, or not and why."""

    accepted: bool
    reason: str = ""


class Dispatch(NamedTuple):
    """Run ``phase`` of a request on ``instance_id``; for DECODE the KV cache is on
    ``source_instance_id`` and the backend moves it (the PD hand-off). A NamedTuple, as
    Admission and Abort: immutable and cheap to build (one or two per request)."""

    request: RequestMetadata
    instance_id: str
    phase: Phase
    source_instance_id: str | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Migration(NamedTuple):
    """Move a running decode from ``source_instance_id`` to ``instance_id`` (a slot held
    there meanwhile): the driver copies its KV over and reports the hand-over, or that it
    could not (``ControlPlane.end_migration``, ``cancel_migration``)."""

    request: RequestMetadata
    source_instance_id: str
    instance_id: str

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Abort(NamedTuple):
    """Stop a request on an instance (after a cancel); the backend reports nothing more."""

    request_id: str
    instance_id: str


_ACCEPTED: Final = Admission(True)
# Enum members as constants: compiled code reads these directly, where ``Phase.DECODE`` is an
# attribute lookup on the class at every use.
_QUEUED: Final = RequestStatus.QUEUED
_RUNNING: Final = RequestStatus.RUNNING
_COMPLETED: Final = RequestStatus.COMPLETED
_TERMINAL: Final = frozenset(status for status in RequestStatus if status.is_terminal)
_FULL: Final = Phase.FULL
_PREFILL: Final = Phase.PREFILL
_DECODE: Final = Phase.DECODE


class ControlPlane:
    """Global queue, request lifecycle, scheduling policy, router, PD split and metrics."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        router: Router,
        pd_policy: PDPolicy | None = None,
        config: ControlPlaneConfig | None = None,
        metrics: MetricsCollector | None = None,
        latency_model: LatencyModel | None = None,
        quotas: AdmissionPolicy | None = None,
        links: LinkPolicy | None = None,
    ) -> None:
        self.policy = policy
        self.router = router
        self.pd_policy = pd_policy
        #: Admission and dispatch limits per user and tenant (policies/quotas.py); None: none.
        self.quotas = quotas
        #: Which KV paths PD hand-offs may take (policies/recovery); None: every path.
        self.links = links
        self.config = config or ControlPlaneConfig()
        self.metrics = metrics or MetricsCollector(max_records=self.config.max_records)
        #: Predicts the TPOT a new decode would get, for decode targets (``_within_targets``).
        self.latency_model: LatencyModel = latency_model or ObservedLatencyModel()
        self._tpot_targets: dict[str, float] = {}  # DecodingConfig.target_latency_ms by id
        self._requests: dict[str, RequestState] = {}
        self._queue: list[RequestState] = []  # kept in arrival order (seq)
        # prefilled, waiting for a decode instance (by id, in order); still on the prefill one
        self._handoffs: dict[str, RequestState] = {}
        self._instances: dict[str, InstanceState] = {}
        # what policies see, refreshed before a dispatch pass for the instances whose state
        # changed since (``_stale``); those in ``_open`` have capacity
        self._views: dict[str, InstanceView] = {}
        self._stale: set[str] = set()
        self._open: set[str] = set()
        # outlier ejection (cpsim.outliers): ejected instances and when each comes back,
        # and those back on probation
        self._ejected: dict[str, float] = {}
        self._probing: set[str] = set()
        self._erring: set[str] = set()  # instances with failures among their recent outcomes
        self._draining: set[str] = set()  # taking no new requests, finishing what they hold
        self._num_retrying = 0  # active requests that are retries, for the retry budget
        self._aborts: list[Abort] = []  # the core's own (an expired hand-off), for the driver
        self._migrating: dict[str, str] = {}  # request id -> the instance it migrates to
        self.num_migrations = 0  # handed over
        self.num_migrations_cancelled = 0  # started, then given up (the request stayed)
        self._seq = 0
        #: Called with each request as it reaches its terminal state (drivers use it to
        #: wake waiters or keep a bounded status history).
        self.terminal_listeners: list[Callable[[RequestState], None]] = []
        #: Called with each request as it arrives, admitted or not (offered load, for
        #: autoscalers: cpsim/scaling.py).
        self.arrival_listeners: list[Callable[[RequestView], None]] = []

    # ------------------------------------------------------------------ instances
    def add_instance(self, instance: ExecutionInstance, now: float) -> None:
        if instance.instance_id in self._instances:
            raise ValueError(f"instance_id={instance.instance_id!r} is already registered")
        self._instances[instance.instance_id] = InstanceState(
            instance, now, self._stale, self.config.outliers.window
        )
        if instance.target_tpot_ms is not None:
            self._tpot_targets[instance.instance_id] = instance.target_tpot_ms
        self._refresh_view(instance.instance_id)
        self.metrics.on_instance_added(instance, now)

    def remove_instance(self, instance_id: str, now: float, reason: str = "removed") -> list[str]:
        """Unregister; requests on it are requeued or failed. Returns their ids."""
        inst = self._instance(instance_id)
        affected = self._evict(inst, now, f"instance {instance_id} {reason}")
        del self._instances[instance_id]
        self._tpot_targets.pop(instance_id, None)
        self._stale.discard(instance_id)
        del self._views[instance_id]
        self._open.discard(instance_id)
        self._ejected.pop(instance_id, None)
        self._probing.discard(instance_id)
        self._erring.discard(instance_id)
        self._draining.discard(instance_id)
        self.metrics.on_instance_removed(instance_id, now)
        return affected

    def drain_instance(self, instance_id: str) -> None:
        """Route nothing new to the instance (nor hand-offs to it); what it holds runs to
        its end. The driver unregisters it once ``num_on_instance`` is 0."""
        self._instance(instance_id)
        self._draining.add(instance_id)

    def is_draining(self, instance_id: str) -> bool:
        return instance_id in self._draining

    def num_on_instance(self, instance_id: str) -> int:
        """Requests on the instance: running there, or prefilled there awaiting hand-off."""
        return len(self._instance(instance_id).in_flight)

    def on_instance_failure(self, instance_id: str, now: float, reason: str) -> list[str]:
        """The instance crashed: mark it unhealthy; requests on it are requeued or failed."""
        inst = self._instance(instance_id)
        inst.set_health(False)
        return self._evict(inst, now, f"instance {instance_id} failed: {reason}")

    def on_instance_update(self, snapshot: InstanceSnapshot, now: float) -> None:
        inst = self._instances.get(snapshot.instance_id)
        if inst is not None:
            inst.apply(snapshot, now)
            self.metrics.on_snapshot(snapshot, inst.gpu_memory_total_gb, now)

    def set_instance_health(self, instance_id: str, healthy: bool) -> None:
        self._instance(instance_id).set_health(healthy)

    def start_probation(self, instance_id: str) -> None:
        """Trust the instance with a trickle of requests (``outliers.probe_concurrency``)
        until ``outliers.probe_successes`` of them succeed, as after an ejection: for an
        engine just restarted, which may crash again (a crash loop) with whatever it took."""
        self._instance(instance_id).end_ejection()
        self._probing.add(instance_id)

    def instance_views(self) -> list[InstanceView]:
        return [inst.view() for inst in self._instances.values()]

    def instances(self) -> list[ExecutionInstance]:
        """The registered instances, each with its ``current_load`` as of now."""
        out = []
        for inst in self._instances.values():
            inst.instance.current_load = inst.load_frac()
            out.append(inst.instance)
        return out

    def instance_state(self, instance_id: str) -> InstanceState:
        return self._instance(instance_id)

    # ------------------------------------------------------------------ requests
    def on_arrival(self, meta: RequestMetadata, now: float) -> Admission:
        rid = meta.request_id
        if rid in self._requests:
            raise ValueError(f"request_id={rid!r} is already active; request ids must be unique")
        self._seq += 1
        req = RequestState(RequestView.of(meta, now, self._seq))
        for listener in self.arrival_listeners:
            listener(req.view)
        limit = self.config.max_queue_len
        if limit is not None and len(self._queue) >= limit:
            reason = f"queue full: {len(self._queue)} queued, max_queue_len={limit}"
            self._terminate(req, RequestStatus.REJECTED, now, reason)
            return new_namedtuple(Admission, (False, reason))
        if self.quotas is not None:
            refused = self.quotas.admit(req.view, now)
            if refused is not None:
                self._terminate(req, RequestStatus.REJECTED, now, refused)
                return new_namedtuple(Admission, (False, refused))
        self._requests[rid] = req
        req.status = _QUEUED
        self._queue.append(req)
        self.metrics.on_arrival(now)
        return _ACCEPTED

    def cancel(self, request_id: str, now: float) -> Abort | None:
        """Cancel a queued or running request. Returns the Abort a backend must carry out
        when the request was on an instance. Unknown or finished ids raise ValueError."""
        req = self._active(request_id)
        abort = None
        if req.status is _QUEUED:
            self._remove_queued(req)
        elif req.instance_id is not None:
            abort = Abort(request_id, req.instance_id)
            self._release(req, now)
        self._terminate(req, RequestStatus.CANCELLED, now, "cancelled")
        return abort

    def status(self, request_id: str) -> RequestStatus | None:
        req = self._requests.get(request_id)
        return None if req is None else req.status

    def request_state(self, request_id: str) -> RequestState | None:
        return self._requests.get(request_id)

    def _running(
        self, request_id: str, instance_id: str | None, handoff_ok: bool = False
    ) -> RequestState | None:
        """The request an engine event is about, or None when the event is stale: the
        request is finished, not running, (when the backend names the instance) was moved to
        another instance since, or its prefill is done and it waits for a decode instance
        (then only a failure of the prefill instance still concerns it: ``handoff_ok``)."""
        req = self._requests.get(request_id)
        if req is None or req.status is not _RUNNING:
            return None
        if instance_id is not None and req.instance_id != instance_id:
            return None
        if not handoff_ok and request_id in self._handoffs:
            return None
        return req

    def on_first_token(self, request_id: str, now: float, instance_id: str | None = None) -> None:
        req = self._running(request_id, instance_id)
        if req is None or req.first_token_s is not None:
            return
        req.first_token_s = now
        req.num_output_tokens = max(req.num_output_tokens, 1)
        inst = self._instances.get(req.instance_id or "")
        if inst is not None:
            inst.on_first_token(req, now)
        source, target = req.prefill_instance_id, req.instance_id
        if self.links is not None and req.phase is _DECODE and source and target != source:
            assert target is not None
            self.links.on_result(source, target, True, now)  # a hand-off's KV arrived

    def on_tokens(
        self, request_id: str, num_tokens: int, now: float, instance_id: str | None = None
    ) -> None:
        """``num_tokens`` more output tokens (the first one included if not reported)."""
        req = self._running(request_id, instance_id)
        if req is None:
            return
        if req.first_token_s is None:
            self.on_first_token(request_id, now, instance_id)
            num_tokens -= 1
        req.num_output_tokens += max(0, num_tokens)
        req.last_token_s = now

    def on_prefill_done(self, request_id: str, now: float, instance_id: str | None = None) -> None:
        """A PREFILL dispatch finished: the request waits for a decode instance."""
        req = self._running(request_id, instance_id)
        if req is None or req.phase is not _PREFILL:
            return
        req.prefill_done_s = now
        req.phase = _DECODE
        self._handoffs[request_id] = req
        self._record_outcome(req.instance_id, False, now)

    def on_finish(
        self,
        request_id: str,
        now: float,
        num_output_tokens: int | None = None,
        instance_id: str | None = None,
        extras: Mapping[str, float] | None = None,
    ) -> None:
        """The request finished on its instance (its last token now; ``num_output_tokens``,
        when given, is the total). ``extras`` are backend facts recorded as extra columns
        (preemptions, prefix-hit tokens, ...)."""
        req = self._running(request_id, instance_id)
        if req is None:
            return
        if num_output_tokens is not None:
            req.num_output_tokens = req.token_offset + num_output_tokens
        req.last_token_s = now
        if extras:
            req.extras.update(extras)
        if req.first_token_s is None:
            req.first_token_s = now
        inst = self._instances.get(req.instance_id or "")
        if inst is not None:
            inst.on_complete(req, now)
        self._record_outcome(req.instance_id, False, now)
        self._release(req, now)
        self._terminate(req, _COMPLETED, now, "")

    def on_failure(
        self,
        request_id: str,
        now: float,
        reason: str,
        retryable: bool = True,
        instance_id: str | None = None,
        instance_fault: bool = True,
    ) -> None:
        """The backend could not serve the request (engine error, timeout, lost instance).
        ``instance_fault``: the instance is to blame (an engine error, a timeout), not the
        request itself (a prompt the model cannot take): it counts towards ejecting the
        instance, and a retry avoids it."""
        req = self._running(request_id, instance_id, handoff_ok=True)
        if req is None:
            return
        if instance_fault and req.instance_id is not None:
            self._record_outcome(req.instance_id, True, now)
            req.failed_on += (req.instance_id,)
        self._release(req, now)
        self._requeue_or_fail(req, now, reason, retryable, budgeted=True)

    def on_link_failure(
        self, request_id: str, now: float, reason: str, instance_id: str | None = None
    ) -> None:
        """A hand-off's KV did not reach its decode instance (the link between the two
        failed). With a link policy the path is blamed, not the decode instance; without
        one, it is an error of the decode instance, as ``on_failure``."""
        req = self._running(request_id, instance_id, handoff_ok=True)
        if req is None:
            return
        source, target = req.prefill_instance_id, req.instance_id
        if self.links is None or source is None or target is None:
            self.on_failure(request_id, now, reason, instance_id=instance_id)
            return
        self.links.on_result(source, target, False, now)
        req.failed_on += (target,)  # the retry avoids it, but it is not counted against it
        self.on_failure(request_id, now, reason, instance_id=instance_id, instance_fault=False)

    def fail_all(self, now: float, reason: str) -> list[str]:
        """Cancel everything still active (used when a driver stops)."""
        ids = list(self._requests)
        for rid in ids:
            req = self._requests[rid]
            self._release(req, now)
            if req.status is _QUEUED:
                self._remove_queued(req)
            self._terminate(req, RequestStatus.CANCELLED, now, reason)
        return ids

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, now: float) -> list[Dispatch]:
        """Place what can be placed now: hand-offs first (they hold KV on a prefill
        instance), then the queue in the scheduling policy's order."""
        if self.config.queue_timeout_s is not None:
            self._expire(now)
        if self._ejected:
            self._end_ejections(now)
        if self._erring:
            self._age_outcomes(now)
        if not self._queue and not self._handoffs:
            return []
        views = self._fresh_views()
        out: list[Dispatch] = []
        if self._handoffs:
            self._dispatch_handoffs(views, now, out)
            self._fresh_views()  # the policy orders the queue on views after the hand-offs
        if self._queue and self._open:
            self._dispatch_queue(views, now, out)
        return out

    def _fresh_views(self) -> dict[str, InstanceView]:
        """The views, with those of instances that changed since the last call rebuilt."""
        if self._stale:
            for iid in self._stale:
                self._refresh_view(iid)
            self._stale.clear()
        return self._views

    def _refresh_view(self, instance_id: str) -> None:
        """Rebuild one instance's view and keep ``_open`` in step with it."""
        inst = self._instances[instance_id]
        self._views[instance_id] = inst.view()
        if inst.has_capacity():
            self._open.add(instance_id)
        else:
            self._open.discard(instance_id)

    def _dispatch_handoffs(
        self, views: dict[str, InstanceView], now: float, out: list[Dispatch]
    ) -> None:
        for req in list(self._handoffs.values()):
            self._fresh_views()  # the instance of the last hand-off placed
            source = req.instance_id
            cands = self._candidates(req.view, _DECODE, views, req.failed_on)
            if self.links is not None and cands and source is not None:
                cands = [v for v in cands if self._path_open(req, source, v.instance_id, now)]
            if not cands and not self._decode_reachable(req, source, views, now):
                # no decode instance is up (or none over a path not cut): decode where the
                # KV already is, if that is up
                own = views.get(source or "")
                cands = [own] if own is not None and own.is_healthy else []
            choice = self.router.route(req.view, cands, now) if cands else None
            if choice is None:
                continue
            if self.links is not None and source is not None and choice.instance_id != source:
                self.links.on_handoff(source, choice.instance_id, now)
            self._release(req, now)
            self._assign(req, choice.instance_id, _DECODE, now)
            req.decode_instance_id = choice.instance_id
            out.append(Dispatch(req.view.meta, choice.instance_id, _DECODE, source))

    def _prefill_fallback(
        self, rview: RequestView, views: dict[str, InstanceView], avoid: tuple[str, ...]
    ) -> list[InstanceView]:
        """Prefill instances that may run a request whole, when no instance that decodes its
        model is up to do it (a prefill-only pool must not leave the queue stuck)."""
        if self._decode_instance_up(rview, views):
            return []
        return self._candidates(rview, _PREFILL, views, avoid)

    def _decode_reachable(
        self, req: RequestState, source: str | None, views: dict[str, InstanceView], now: float
    ) -> bool:
        """Whether a decode instance is up (``_decode_instance_up``) over a KV path from
        ``source`` open to the request (``_path_open``)."""
        if self.links is None or source is None:
            return self._decode_instance_up(req.view, views)
        return self._decode_instance_up(
            req.view, views, lambda target: self._path_open(req, source, target, now)
        )

    def _path_open(self, req: RequestState, source: str, target: str, now: float) -> bool:
        """Whether the link policy lets the request's KV go from ``source`` to ``target``.
        A request that failed already goes only over trusted paths to instances that did
        not fail it (never as the probe of a cut path), so a partition does not spend its
        attempts; a fresh one may probe."""
        assert self.links is not None
        if req.failed_on:
            return target not in req.failed_on and self.links.trusted(source, target)
        return self.links.allows(source, target, now)

    def _decode_instance_up(
        self,
        rview: RequestView,
        views: dict[str, InstanceView],
        reachable: Callable[[str], bool] | None = None,
    ) -> bool:
        """Whether an instance that decodes the request's model is up and not draining:
        one that will take the hand-off once it has room (``reachable``: and whose id it
        accepts)."""
        model = rview.model_name
        return any(
            v.is_healthy
            and v.instance_type in _PHASE_TYPES[_DECODE]
            and v.serves(model)
            and v.instance_id not in self._draining
            and (reachable is None or reachable(v.instance_id))
            for v in views.values()
        )

    def _dispatch_queue(
        self, views: dict[str, InstanceView], now: float, out: list[Dispatch]
    ) -> None:
        policy, router, requests, quotas = self.policy, self.router, self._requests, self.quotas
        ordered = policy.order([req.view for req in self._queue], list(views.values()), now)
        placed: set[str] = set()
        rejected: list[tuple[RequestState, str]] = []
        for rview in ordered:
            if not self._open:
                break
            req = requests[rview.request_id]
            if quotas is not None:
                held = quotas.hold(rview, now)
                if held is not None:
                    req.held_reason = held
                    continue
            self._fresh_views()  # the instance of the last placement: the next one must see it
            phase = self._phase_for(rview, views, now)
            avoid = req.failed_on
            cands = self._candidates(rview, phase, views, avoid)
            if phase is _PREFILL and cands and self.links is not None:
                reachable = [
                    v for v in cands if self._decode_reachable(req, v.instance_id, views, now)
                ]
                if not reachable:  # every KV path out of the prefill pool is cut: run it whole
                    phase, cands = _FULL, self._candidates(rview, _FULL, views, avoid) + cands
                else:
                    cands = reachable
            if not cands and phase is _PREFILL:
                phase, cands = _FULL, self._candidates(rview, _FULL, views, avoid)
            if not cands and phase is _FULL and self.pd_policy is not None:
                cands = self._prefill_fallback(rview, views, avoid)
            if not cands:
                continue
            placement = policy.place(rview, cands, router, now)
            if placement is None:
                continue
            if placement.reject_reason is not None:
                rejected.append((req, placement.reject_reason))
                continue
            iid = placement.instance_id
            chosen = views.get(iid) if iid is not None else None
            if chosen is None or chosen not in cands:  # a C-level scan; ids differ at once
                raise ValueError(
                    f"policy {self.policy.name!r} placed {rview.request_id!r} on {iid!r}, "
                    f"which is not among the candidates {[c.instance_id for c in cands]}"
                )
            assert iid is not None
            req.predicted_cost_usd = placement.predicted_cost_usd
            req.policy_used = placement.policy or policy.name
            if quotas is not None:
                quotas.on_dispatch(rview, now)
            placed.add(rview.request_id)
            self._assign(req, iid, phase, now)
            if phase is _PREFILL:
                req.prefill_instance_id = iid
            elif phase is _FULL:
                req.decode_instance_id = None
            out.append(new_namedtuple(Dispatch, (rview.meta, iid, phase, None)))
        if placed or rejected:
            if len(placed) == len(self._queue):
                self._queue = []
            else:
                self._queue = [r for r in self._queue if r.view.request_id not in placed]
        for req, reason in rejected:
            self._remove_queued(req)
            self._terminate(req, RequestStatus.REJECTED, now, reason)

    def _phase_for(self, rview: RequestView, views: dict[str, InstanceView], now: float) -> Phase:
        if self.pd_policy is None:
            return _FULL
        return (
            _PREFILL
            if self.pd_policy.disaggregate(rview, list(views.values()), now)
            else _FULL
        )

    def _types_for(
        self, phase: Phase, views: dict[str, InstanceView]
    ) -> tuple[ExecutionInstanceType, ...] | None:
        """Instance types that may serve ``phase`` (None: any, when PD is off)."""
        if self.pd_policy is None and phase is not _DECODE:
            return None
        if phase is _DECODE and any(
            v.is_healthy and v.instance_type is ExecutionInstanceType.DECODING
            for v in views.values()
        ):
            return (ExecutionInstanceType.DECODING,)  # general ones only when no decode pool
        return _PHASE_TYPES[phase] if self.pd_policy is not None else None

    def _candidates(
        self,
        rview: RequestView,
        phase: Phase,
        views: dict[str, InstanceView],
        avoid: tuple[str, ...] = (),
    ) -> list[InstanceView]:
        """Instances that may take ``phase`` of the request now: healthy, with capacity,
        serving its model and phase, trusted (``_trusted``), and within their decode
        targets (``_within_targets``). ``avoid``: the instances that failed the request."""
        model = rview.model_name
        types = self._types_for(phase, views)
        # ``v.has_capacity`` and ``v.serves``, inlined (a call per instance per request adds up)
        cands = [
            v
            for v in views.values()
            if v.is_healthy
            and v.in_flight < v.max_concurrent_requests
            and (model is None or v.model_name == model or model in v.adapters)
            and (types is None or v.instance_type in types)
        ]
        if cands and self._draining:
            cands = [v for v in cands if v.instance_id not in self._draining]
        if cands and (self._ejected or self._probing or avoid):
            cands = self._trusted(cands, model, types, views, avoid)
        if self._tpot_targets and phase is not _PREFILL and len(cands) > 1:
            return self._within_targets(rview, cands)
        return cands

    def _trusted(
        self,
        cands: list[InstanceView],
        model: str | None,
        types: tuple[ExecutionInstanceType, ...] | None,
        views: dict[str, InstanceView],
        avoid: tuple[str, ...],
    ) -> list[InstanceView]:
        """``cands`` less the suspects (ejected instances, those that failed this request)
        and less the instances on probation that already hold their trickle of probe
        requests. When none is left but the pool has a trusted instance (full now), the
        request waits for it; when the whole pool is suspect, a request is better served
        by a suspect instance than by none: the candidates not in ``avoid``, else all."""
        ejected, probing = self._ejected, self._probing
        limit = self.config.outliers.probe_concurrency
        kept = [
            v
            for v in cands
            if v.instance_id not in ejected
            and v.instance_id not in avoid
            and (v.instance_id not in probing or v.in_flight < limit)
        ]
        if kept:
            return kept
        if any(
            v.is_healthy
            and v.serves(model)
            and (types is None or v.instance_type in types)
            and v.instance_id not in ejected
            and v.instance_id not in avoid
            for v in views.values()
        ):
            return []
        return [v for v in cands if v.instance_id not in avoid] or cands

    def _record_outcome(self, instance_id: str | None, failed: bool, now: float) -> None:
        """Count a request's outcome on its instance, and eject the instance when it has
        become an outlier (``cpsim.outliers``) and the cap on ejections allows."""
        inst = self._instances.get(instance_id or "")
        if inst is None:
            return
        assert instance_id is not None
        health = inst.outliers
        if not failed and health.num_failed == 0 and not health.consecutive_failures and (
            not health.probing
        ):
            return  # nothing on record to dilute or reset: every request that ends well
        config = self.config.outliers
        reason = inst.record_outcome(failed, now, config)
        if failed:
            self._erring.add(instance_id)
        if not inst.outliers.probing:
            self._probing.discard(instance_id)
        if (
            reason is None
            or not config.enabled
            or len(self._ejected) >= config.max_ejected(len(self._instances))
        ):
            return
        inst.outliers.eject(now, reason, config)
        self._probing.discard(instance_id)
        until = inst.outliers.ejected_until_s
        assert until is not None
        self._ejected[instance_id] = until
        self.metrics.on_ejection(instance_id, now, until, reason)

    def _age_outcomes(self, now: float) -> None:
        """Old failures stop counting (their instance's error rate falls)."""
        window_s = self.config.outliers.window_s
        for iid in list(self._erring):
            inst = self._instances[iid]
            inst.age_outcomes(now, window_s)
            if inst.outliers.num_failed == 0:
                self._erring.discard(iid)

    def _end_ejections(self, now: float) -> None:
        """Ejections that are over put their instance on probation."""
        for iid, until in list(self._ejected.items()):
            if until <= now:
                del self._ejected[iid]
                self._probing.add(iid)
                self._instances[iid].end_ejection()

    def _within_targets(
        self, rview: RequestView, cands: list[InstanceView]
    ) -> list[InstanceView]:
        """A new decode goes to no instance whose predicted TPOT is above its
        ``DecodingConfig.target_latency_ms`` while another candidate is within its own (or
        has none); when every candidate is above, all of them stay candidates."""
        within = []
        for v in cands:
            target = self._tpot_targets.get(v.instance_id)
            if target is None or self.latency_model.predict(rview, v).tpot_s * 1000.0 <= target:
                within.append(v)
        return within or cands

    # ------------------------------------------------------------------ internals
    def _assign(
        self,
        req: RequestState,
        instance_id: str,
        phase: Phase,
        now: float,
    ) -> None:
        inst = self._instances[instance_id]
        req.status = _RUNNING
        req.phase = phase
        req.instance_id = instance_id
        if phase is not _DECODE:  # a hand-off continues the same attempt
            req.attempts += 1
        else:
            req.handoff_s = now
        if req.dispatch_s is None:
            req.dispatch_s = now
        inst.admit(req, now)  # marks the view stale: rebuilt before the next placement

    def _release(self, req: RequestState, now: float) -> None:
        """The request leaves its instance (and the hand-off wait, if it was in it; and
        its migration, if it was migrating)."""
        if self._handoffs:
            self._handoffs.pop(req.view.request_id, None)
        if self._migrating:
            self.cancel_migration(req.view.request_id)
        inst = self._instances.get(req.instance_id or "")
        if inst is not None:
            inst.release(req, now)

    def _evict(self, inst: InstanceState, now: float, reason: str) -> list[str]:
        for rid in list(inst.incoming):  # their KV was on its way here: they stay put
            self.cancel_migration(rid)
        affected = list(inst.in_flight)
        for rid in affected:
            req = self._requests[rid]
            self._release(req, now)
            self._requeue_or_fail(req, now, reason, retryable=True)
        return affected

    def _requeue_or_fail(
        self, req: RequestState, now: float, reason: str, retryable: bool, budgeted: bool = False
    ) -> None:
        """Requeue the request for another attempt, or fail it. ``budgeted``: the retry is
        one the retry budget must allow (see ``ControlPlaneConfig``)."""
        can_retry = (
            retryable
            and self.config.on_instance_failure == "requeue"
            and req.first_token_s is None
            and req.attempts < self.config.max_attempts
        )
        if can_retry and budgeted and not req.is_budgeted_retry:
            budget = max(
                float(self.config.min_retry_concurrency),
                self.config.retry_budget_frac * len(self._requests),
            )
            if self._num_retrying + 1 > budget:
                reason = (
                    f"{reason}; not retried: the retry budget is spent ({self._num_retrying} "
                    f"of {len(self._requests)} active requests are retries; "
                    f"retry_budget_frac={self.config.retry_budget_frac}, "
                    f"min_retry_concurrency={self.config.min_retry_concurrency})"
                )
                can_retry = False
            else:
                req.is_budgeted_retry = True
                self._num_retrying += 1
        if not can_retry:
            self._terminate(req, RequestStatus.FAILED, now, reason)
            return
        req.status = _QUEUED
        req.phase = None
        req.instance_id = None
        req.prefill_instance_id = None
        req.retry_reasons.append(reason)
        keys = [r.view.seq for r in self._queue]
        self._queue.insert(bisect.bisect_left(keys, req.view.seq), req)

    def _expire(self, now: float) -> None:
        timeout = self.config.queue_timeout_s
        assert timeout is not None
        expired = [r for r in self._queue if now - r.view.arrival_s > timeout]
        for req in expired:
            self._remove_queued(req)
            reason = f"queued longer than {timeout} s"
            if req.held_reason:
                reason += f", held by its quota: {req.held_reason}"
            self._terminate(req, RequestStatus.FAILED, now, reason)
        if self._handoffs:
            self._expire_handoffs(now, timeout)

    def _expire_handoffs(self, now: float, timeout: float) -> None:
        """Prefilled requests no decode instance took within ``timeout`` fail; their
        prefill instance is told to let go of their KV (an Abort for the driver)."""
        for req in list(self._handoffs.values()):
            assert req.prefill_done_s is not None
            if now - req.prefill_done_s <= timeout:
                continue
            source = req.instance_id
            self._release(req, now)
            if source is not None:
                self._aborts.append(Abort(req.view.request_id, source))
            self._terminate(
                req,
                RequestStatus.FAILED,
                now,
                f"prefilled on {source}, but no decode instance took it within {timeout} s",
            )

    def next_wakeup_s(self) -> float | None:
        """When a dispatch pass could place something that the last one held back for a
        reason only time lifts (a quota's rate limit); None: nothing such is waiting.
        Drivers that dispatch only on events wake up then."""
        if self.quotas is None or not self._queue:
            return None
        return self.quotas.next_release_s()

    # ------------------------------------------------------------------ migration
    def migration_problem(self, request_id: str, target_id: str) -> str | None:
        """Why the request cannot start migrating to ``target_id`` now; None when it can.
        A request migrates while it decodes (its first token out, not awaiting a PD
        hand-off, not migrating already) to another healthy, trusted, not draining instance
        that decodes its model and has a free slot."""
        req = self._requests.get(request_id)
        if req is None or req.status is not _RUNNING:
            return f"request {request_id!r} is not running"
        if req.first_token_s is None or req.phase is _PREFILL or request_id in self._handoffs:
            return f"request {request_id!r} is not decoding yet"
        if request_id in self._migrating:
            return f"request {request_id!r} is already migrating to {self._migrating[request_id]}"
        inst = self._instances.get(target_id)
        if inst is None:
            return f"instance {target_id!r} is not registered"
        if target_id == req.instance_id:
            return f"request {request_id!r} is already on {target_id}"
        view = inst.view()
        model = req.view.model_name
        if view.instance_type not in _PHASE_TYPES[_DECODE]:
            return f"instance {target_id} is {view.instance_type.value}; it does not decode"
        if not view.serves(model):
            return f"instance {target_id} serves {view.model_name!r}, not {model!r}"
        if target_id in self._draining or target_id in self._ejected:
            return f"instance {target_id} takes no new requests (draining or ejected)"
        if not inst.has_capacity():
            return f"instance {target_id} is down or full"
        return None

    def start_migration(self, request_id: str, target_id: str, now: float) -> Migration:
        """Start moving a decoding request to ``target_id`` (ValueError naming why not:
        ``migration_problem``). It stays on its instance, and its events count there,
        until the driver hands it over (``end_migration``) or gives up
        (``cancel_migration``); a slot on the target is held for it meanwhile."""
        problem = self.migration_problem(request_id, target_id)
        if problem is not None:
            raise ValueError(f"cannot migrate: {problem}")
        req = self._requests[request_id]
        assert req.instance_id is not None
        self._migrating[request_id] = target_id
        self._instances[target_id].reserve(request_id)
        return Migration(req.view.meta, req.instance_id, target_id)

    def migration_target(self, request_id: str) -> str | None:
        """Where the request is migrating; None when it is not (any more)."""
        return self._migrating.get(request_id)

    def cancel_migration(self, request_id: str) -> bool:
        """Give up the request's migration, if any (it stays where it runs); False if none."""
        target = self._migrating.pop(request_id, None)
        if target is None:
            return False
        inst = self._instances.get(target)
        if inst is not None:
            inst.unreserve(request_id)
        self.num_migrations_cancelled += 1
        return True

    def end_migration(
        self, request_id: str, num_output_tokens: int, now: float, downtime_s: float = 0.0
    ) -> bool:
        """The hand-over: the request, stopped on its instance after ``num_output_tokens``
        tokens in all, now runs on its migration's target, whose reports count from there
        (its ``on_finish`` gives the tokens it made itself). False when the migration is no
        longer on (the request ended, or the target went): nothing changes here, and the
        driver resumes it where it was (``resume``)."""
        target = self._migrating.pop(request_id, None)
        req = self._requests.get(request_id)
        if target is None or req is None:
            return False
        dst = self._instances[target]
        dst.unreserve(request_id)
        src = self._instances.get(req.instance_id or "")
        if src is not None:
            src.release(req, now)
        self._set_offset(req, num_output_tokens)
        req.instance_id = target
        if req.phase is _DECODE:
            req.decode_instance_id = target
        dst.admit(req, now)
        req.extras["num_migrations"] = req.extras.get("num_migrations", 0.0) + 1.0
        downtime = req.extras.get("migration_downtime_s", 0.0) + downtime_s
        req.extras["migration_downtime_s"] = downtime
        self.num_migrations += 1
        return True

    def resume(self, request_id: str, num_output_tokens: int) -> None:
        """A request stopped for a hand-over that did not happen runs on where it was, from
        ``num_output_tokens`` tokens: its instance's reports count from there."""
        req = self._requests.get(request_id)
        if req is not None:
            self._set_offset(req, num_output_tokens)

    def _set_offset(self, req: RequestState, num_output_tokens: int) -> None:
        req.num_output_tokens = max(req.num_output_tokens, num_output_tokens)
        req.token_offset = num_output_tokens

    @property
    def num_migrating(self) -> int:
        return len(self._migrating)

    def take_aborts(self) -> list[Abort]:
        """Aborts the core decided on its own since the last call (an expired hand-off);
        a driver carries them out after each ``dispatch``."""
        aborts, self._aborts = self._aborts, []
        return aborts

    def _remove_queued(self, req: RequestState) -> None:
        self._queue.remove(req)

    def _terminate(self, req: RequestState, status: RequestStatus, now: float, reason: str) -> None:
        assert req.status not in _TERMINAL, f"{req.view.request_id} is already {req.status.name}"
        req.status = status
        req.finish_s = now
        req.reason = reason
        if req.is_budgeted_retry:
            self._num_retrying -= 1
        if self.quotas is not None:
            self.quotas.on_end(req.view.request_id)
        self._requests.pop(req.view.request_id, None)
        slo_met = self.metrics.on_terminal(req, self._instances)
        if status is _COMPLETED:
            self.policy.observe(req.view, slo_met, now)
        for listener in self.terminal_listeners:
            listener(req)

    def _active(self, request_id: str) -> RequestState:
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"request_id={request_id!r} is not an active request")
        return req

    def _instance(self, instance_id: str) -> InstanceState:
        inst = self._instances.get(instance_id)
        if inst is None:
            known = ", ".join(self._instances) or "none"
            raise ValueError(f"instance_id={instance_id!r} is not registered; registered: {known}")
        return inst

    # ------------------------------------------------------------------ introspection
    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def num_active(self) -> int:
        return len(self._requests)

    @property
    def num_handoffs(self) -> int:
        """Prefilled requests waiting for a decode instance."""
        return len(self._handoffs)

    @property
    def num_running(self) -> int:
        return len(self._requests) - len(self._queue)

    def active_ids(self) -> Iterable[str]:
        return self._requests.keys()

    def summary(self, now: float) -> PerformanceMetrics:
        """The run summary so far: terminal records plus what is still active."""
        return self.metrics.summary(now, self._instances, self.num_active, self.num_queued)

    def queued_views(self) -> list[RequestView]:
        return [r.view for r in self._queue]


class ControlPlaneEvents:
    """EngineEvents applied to a ControlPlane. ``on_change(now)`` runs after each event that
    may free capacity or add work (a driver's dispatch pass); token events do not trigger it.
    Events about an instance the control plane no longer knows are ignored."""

    def __init__(self, core: ControlPlane, on_change: Callable[[float], None]) -> None:
        self.core = core
        self.on_change = on_change

    def on_first_token(self, request_id: str, instance_id: str, now: float) -> None:
        self.core.on_first_token(request_id, now, instance_id)

    def on_tokens(self, request_id: str, instance_id: str, num_tokens: int, now: float) -> None:
        self.core.on_tokens(request_id, num_tokens, now, instance_id)

    def on_prefill_done(self, request_id: str, instance_id: str, now: float) -> None:
        self.core.on_prefill_done(request_id, now, instance_id)
        self.on_change(now)

    def on_finish(
        self,
        request_id: str,
        instance_id: str,
        num_output_tokens: int,
        now: float,
        extras: Mapping[str, float] | None = None,
    ) -> None:
        self.core.on_finish(request_id, now, num_output_tokens, instance_id, extras)
        self.on_change(now)

    def on_failure(
        self,
        request_id: str,
        instance_id: str,
        reason: str,
        now: float,
        retryable: bool = True,
        instance_fault: bool = True,
    ) -> None:
        self.core.on_failure(request_id, now, reason, retryable, instance_id, instance_fault)
        self.on_change(now)

    def on_link_failure(self, request_id: str, instance_id: str, reason: str, now: float) -> None:
        """A hand-off's KV did not reach ``instance_id`` (its decode instance)."""
        self.core.on_link_failure(request_id, now, reason, instance_id)
        self.on_change(now)

    def on_instance_failure(self, instance_id: str, reason: str, now: float) -> None:
        with contextlib.suppress(ValueError):
            self.core.on_instance_failure(instance_id, now, reason)
        self.on_change(now)

    def on_instance_recovered(self, instance_id: str, now: float) -> None:
        with contextlib.suppress(ValueError):
            self.core.set_instance_health(instance_id, True)
        self.on_change(now)

    def on_snapshot(self, snapshot: InstanceSnapshot, now: float) -> None:
        self.core.on_instance_update(snapshot, now)
