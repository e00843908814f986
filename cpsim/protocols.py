"""The roles policies play for the control plane: what each receives and must return."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from cpsim.views import DecodeView, InstanceView, PoolView, RequestView


class Placement(NamedTuple):
    """A scheduling policy's answer for one request: an instance, or a rejection.

    ``predicted_cost_usd`` and ``policy`` are recorded on the request (cost-aware and
    adaptive policies fill them). A NamedTuple (one is built per placed request)."""

    instance_id: str | None = None
    reject_reason: str | None = None
    predicted_cost_usd: float | None = None
    policy: str | None = None


@dataclass(frozen=True, slots=True)
class LatencyEstimate:
    """Predicted latencies of a request on an instance, in seconds."""

    ttft_s: float
    tpot_s: float

    def e2e_s(self, num_output_tokens: int) -> float:
        return self.ttft_s + self.tpot_s * max(0, num_output_tokens - 1)


@runtime_checkable
class LatencyModel(Protocol):
    """Predicts how long a request would take on an instance as it is now."""

    def predict(self, request: RequestView, instance: InstanceView) -> LatencyEstimate: ...


@runtime_checkable
class Router(Protocol):
    """Picks one instance for a request among candidates that already fit it (healthy,
    serving its model and phase, with capacity). Returns None to leave it queued."""

    @property
    def name(self) -> str: ...

    def route(
        self, request: RequestView, candidates: Sequence[InstanceView], now: float
    ) -> InstanceView | None: ...


@runtime_checkable
class SchedulingPolicy(Protocol):
    """Decides which queued request goes next and, through ``place``, where.

    ``order`` returns the queue in dispatch order (it may drop nothing: every request it is
    given must appear once). ``place`` returns a Placement or None to keep the request
    queued; the default places where the router says. ``observe`` is told each request
    that completes, with whether it met its SLO (None without one).
    """

    @property
    def name(self) -> str: ...

    def order(
        self, queue: Sequence[RequestView], instances: Sequence[InstanceView], now: float
    ) -> Sequence[RequestView]: ...

    def place(
        self,
        request: RequestView,
        candidates: Sequence[InstanceView],
        router: Router,
        now: float,
    ) -> Placement | None: ...

    def observe(self, request: RequestView, slo_met: bool | None, now: float) -> None: ...


@runtime_checkable
class PDPolicy(Protocol):
    """Decides whether a request's prefill runs on a separate prefill instance."""

    @property
    def name(self) -> str: ...

    def disaggregate(
        self, request: RequestView, instances: Sequence[InstanceView], now: float
    ) -> bool: ...


@runtime_checkable
class AdmissionPolicy(Protocol):
    """Decides whether a request may enter the queue and when a queued one may be dispatched
    (quotas, rate limits). ``admit``: None to queue it, else the reason it is rejected;
    ``hold``: None when it may be dispatched now, else why it waits; ``on_dispatch`` /
    ``on_end``: it was placed / reached its terminal state; ``next_release_s``: when a held
    request could next go (None: when something ends), for drivers to wake up then."""

    @property
    def name(self) -> str: ...

    def admit(self, request: RequestView, now: float) -> str | None: ...

    def hold(self, request: RequestView, now: float) -> str | None: ...

    def on_dispatch(self, request: RequestView, now: float) -> None: ...

    def on_end(self, request_id: str) -> None: ...

    def next_release_s(self) -> float | None: ...


@runtime_checkable
class Autoscaler(Protocol):
    """Decides how many instances each pool should have. Every ``interval_s`` the driver
    shows it each pool and starts (with a cold start) or drains instances to meet the
    count it returns, within the pool's bounds."""

    @property
    def name(self) -> str: ...

    @property
    def interval_s(self) -> float: ...

    def target(self, pool: PoolView) -> int: ...


@runtime_checkable
class MigrationPolicy(Protocol):
    """Rebalances running decodes between instances (as Llumnix does). Every ``interval_s``
    the driver shows it the instances and the requests decoding on each (those not already
    migrating) and starts the migrations it returns, as (request id, target instance id);
    the core refuses any that is not possible (``ControlPlane.migration_problem``)."""

    @property
    def name(self) -> str: ...

    @property
    def interval_s(self) -> float: ...

    def plan(
        self,
        instances: Sequence[InstanceView],
        decoding: Mapping[str, Sequence[DecodeView]],
        now: float,
    ) -> list[tuple[str, str]]: ...


@runtime_checkable
class RestartPolicy(Protocol):
    """Decides whether and when an engine whose process died is restarted (fault
    recovery). The driver asks at each crash that nothing else brings back, with the
    engine's crash times so far (oldest first, the one just now last); it restarts the
    engine that many seconds later (plus the engine's own start-up), or leaves it down for
    good on None. ``probation``: a restarted engine takes a trickle of requests until a
    few succeed (the outlier probation), so a crash loop costs a few requests per restart
    rather than a full share of the traffic."""

    @property
    def name(self) -> str: ...

    @property
    def probation(self) -> bool: ...

    def restart_delay(self, crash_times: Sequence[float], now: float) -> float | None: ...


@runtime_checkable
class LinkPolicy(Protocol):
    """Decides which KV paths (prefill instance -> decode instance) PD hand-offs may take,
    from how hand-offs over each ended (fault recovery for network partitions between PD
    pools). The core asks ``allows`` before it hands a request over, reports each hand-off
    it starts (``on_handoff``) and how it ended (``on_result``: the KV arrived, or the link
    failed); where no path from a prefill instance is allowed, the request decodes where it
    was prefilled, and new requests run whole instead of disaggregated. A request that
    already failed on a link is handed over ``trusted`` paths only (never as the probe of a
    path that was cut), so a partition does not spend its attempts."""

    @property
    def name(self) -> str: ...

    def allows(self, source: str, target: str, now: float) -> bool: ...

    def trusted(self, source: str, target: str) -> bool: ...

    def on_handoff(self, source: str, target: str, now: float) -> None: ...

    def on_result(self, source: str, target: str, ok: bool, now: float) -> None: ...

    def cut_paths(self, now: float) -> list[tuple[str, str, float]]: ...
