"""The gateway's Prometheus metrics, named in vLLM's style with the prefix ``cpsim:``.

Counters and histograms are updated as each request ends (from its ``RequestState``: the
control plane's own times, the same ones ``get_metrics`` reports); gauges are read from the
control plane at each scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cpsim.requests import RequestState
from cpsim.types import RequestStatus

LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0,
)
TPOT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5,
)


def reason_category(status: RequestStatus, reason: str) -> str:
    """A bounded label for why a request ended (the reason itself is free text)."""
    if status is RequestStatus.COMPLETED:
        return "finished"
    if status is RequestStatus.CANCELLED:
        return reason if reason in ("client_disconnect", "shutdown") else "cancelled"
    if status is RequestStatus.REJECTED:
        if reason.startswith("rejected by quota"):
            return "quota"
        return "queue_full" if reason.startswith("queue full") else "policy"
    if reason.startswith("queued longer than"):
        return "queue_timeout"
    if "no decode instance took it" in reason:
        return "handoff_timeout"
    if "retry budget is spent" in reason:
        return "retry_budget"
    if " failed: " in reason or (reason.startswith("instance ") and " removed" in reason):
        return "instance_failure"
    return "engine_error"


class _Gauges(Collector):
    """Queue depth and per-instance state, read from the control plane at each scrape."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        core = self.manager.core
        now = self.manager._now()
        yield GaugeMetricFamily(
            "cpsim:num_requests_waiting", "Requests queued in the control plane",
            value=core.num_queued,
        )
        yield GaugeMetricFamily(
            "cpsim:num_requests_running", "Requests on an instance", value=core.num_running
        )
        yield GaugeMetricFamily(
            "cpsim:num_handoffs_waiting",
            "Prefilled requests waiting for a decode instance",
            value=core.num_handoffs,
        )
        families = {
            "in_flight": GaugeMetricFamily(
                "cpsim:instance_in_flight", "Requests the control plane has on the instance",
                labels=["instance"],
            ),
            "healthy": GaugeMetricFamily(
                "cpsim:instance_healthy", "1 if the instance is up", labels=["instance"]
            ),
            "ejected": GaugeMetricFamily(
                "cpsim:instance_ejected",
                "1 if outlier detection keeps routing away from the instance",
                labels=["instance"],
            ),
            "draining": GaugeMetricFamily(
                "cpsim:instance_draining", "1 if the instance takes nothing new",
                labels=["instance"],
            ),
            "kv": GaugeMetricFamily(
                "cpsim:instance_kv_cache_usage_perc",
                "KV-cache use the instance last reported (0-1)",
                labels=["instance"],
            ),
            "error_rate": GaugeMetricFamily(
                "cpsim:instance_error_rate", "Share of recent requests that failed there",
                labels=["instance"],
            ),
        }
        for view in core.instance_views():
            iid = view.instance_id
            health = core.instance_state(iid).outliers.describe(now)
            families["in_flight"].add_metric([iid], view.in_flight)
            families["healthy"].add_metric([iid], 1.0 if view.is_healthy else 0.0)
            families["ejected"].add_metric([iid], 1.0 if health["ejected"] else 0.0)
            families["draining"].add_metric([iid], 1.0 if core.is_draining(iid) else 0.0)
            families["kv"].add_metric([iid], view.kv_cache_usage_frac)
            families["error_rate"].add_metric([iid], view.recent_error_rate)
        yield from families.values()


class GatewayMetrics:
    """The gateway's metrics in their own registry (``registry``), served at /metrics."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cpsim:requests", "Requests by final status and reason", ["status", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "cpsim:time_to_first_token_seconds", "Arrival to first token",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.tpot = Histogram(
            "cpsim:time_per_output_token_seconds", "Mean time per output token after the first",
            buckets=TPOT_BUCKETS_S, registry=r,
        )
        self.e2e = Histogram(
            "cpsim:e2e_request_latency_seconds", "Arrival to last token, completed requests",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.queue_time = Histogram(
            "cpsim:request_queue_time_seconds", "Arrival to first dispatch to an instance",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.prompt_tokens = Counter(
            "cpsim:prompt_tokens", "Prompt tokens of completed requests (estimated)",
            registry=r,
        )
        self.generation_tokens = Counter(
            "cpsim:generation_tokens", "Output tokens of ended requests", registry=r
        )
        self.routing = Counter(
            "cpsim:routing_decisions", "Dispatches to an instance, by the router in use",
            ["instance", "router"], registry=r,
        )
        self.handoffs = Counter(
            "cpsim:pd_handoffs", "Requests prefilled on one instance and decoded on another",
            registry=r,
        )
        self.retries = Counter(
            "cpsim:retries", "Attempts after a request's first one", registry=r
        )
        self.slo_checked = Counter(
            "cpsim:slo_checked", "Ended requests that had an SLO deadline", registry=r
        )
        self.slo_met = Counter(
            "cpsim:slo_met", "Requests completed within their SLO deadline", registry=r
        )
        self.goodput = Counter(
            "cpsim:goodput_requests",
            "Requests completed within their SLO (or completed, without one)",
            registry=r,
        )
        self.rate_limited = Counter(
            "cpsim:rate_limited", "Requests refused by a rate limit or quota", ["limit"],
            registry=r,
        )
        self.http_errors = Counter(
            "cpsim:http_errors", "Requests answered with an error before the control plane "
            "saw them, by status", ["status"], registry=r,
        )
        r.register(_Gauges(manager))

    def observe(self, req: RequestState, reason_label: str | None = None) -> None:
        """Count one request that reached its terminal state."""
        status, view = req.status, req.view
        label = reason_label or reason_category(status, req.reason)
        self.requests.labels(status.name, label).inc()
        self.generation_tokens.inc(req.num_output_tokens)
        router = self.manager.router.routing_strategy
        instances = [*req.failed_on, req.prefill_instance_id, req.decode_instance_id]
        if req.prefill_instance_id is None and req.decode_instance_id is None:
            instances.append(req.instance_id)
        for iid in instances:
            if iid is not None:
                self.routing.labels(iid, router).inc()
        if req.prefill_instance_id is not None and req.decode_instance_id is not None:
            self.handoffs.inc()
        if req.attempts > 1:
            self.retries.inc(req.attempts - 1)
        arrival = view.arrival_s
        if req.dispatch_s is not None:
            self.queue_time.observe(max(0.0, req.dispatch_s - arrival))
        if req.first_token_s is not None:
            self.ttft.observe(max(0.0, req.first_token_s - arrival))
        slo_met = None
        if status is RequestStatus.COMPLETED:
            self.prompt_tokens.inc(view.num_prompt_tokens)
            end = req.finish_s
            if end is not None:
                self.e2e.observe(max(0.0, end - arrival))
                if view.slo_deadline_ms is not None:
                    slo_met = (end - arrival) * 1000.0 <= view.slo_deadline_ms
            if req.first_token_s is not None and req.num_output_tokens > 1 and end is not None:
                self.tpot.observe((end - req.first_token_s) / (req.num_output_tokens - 1))
        if view.slo_deadline_ms is not None and status is not RequestStatus.CANCELLED:
            self.slo_checked.inc()
            if slo_met:
                self.slo_met.inc()
        if status is RequestStatus.COMPLETED and slo_met is not False:
            self.goodput.inc()
