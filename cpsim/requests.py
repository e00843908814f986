"""A request's mutable progress, owned by the control plane alone."""

from __future__ import annotations

from cpsim.types import RequestStatus
from cpsim.views import Phase, RequestView


class RequestState:
    """Progress of one request; times in seconds of the driver's clock (None: not yet)."""

    __slots__ = (
        "attempts",
        "cost_share_start",
        "cost_usd",
        "decode_instance_id",
        "dispatch_s",
        "extras",
        "failed_on",
        "finish_s",
        "first_token_s",
        "handoff_s",
        "held_reason",
        "instance_id",
        "is_budgeted_retry",
        "last_token_s",
        "num_output_tokens",
        "phase",
        "policy_used",
        "predicted_cost_usd",
        "prefill_done_s",
        "prefill_instance_id",
        "prefill_pending",
        "reason",
        "retry_reasons",
        "status",
        "token_offset",
        "view",
    )

    def __init__(self, view: RequestView) -> None:
        self.view = view
        self.status = RequestStatus.PENDING
        self.phase: Phase | None = None
        self.instance_id: str | None = None
        self.prefill_instance_id: str | None = None
        self.decode_instance_id: str | None = None
        self.dispatch_s: float | None = None
        self.first_token_s: float | None = None
        self.prefill_done_s: float | None = None  # the prefill instance's first token
        self.handoff_s: float | None = None  # sent to its decode instance: the KV moves
        self.last_token_s: float | None = None
        self.finish_s: float | None = None
        self.num_output_tokens = 0
        self.token_offset = 0  # output tokens made before its last migration (see the core)
        self.attempts = 0
        self.reason = ""
        self.predicted_cost_usd: float | None = None
        self.policy_used: str | None = None
        self.retry_reasons: list[str] = []
        self.cost_usd = 0.0
        self.cost_share_start = 0.0
        self.prefill_pending = False
        self.extras: dict[str, float] = {}
        self.failed_on: tuple[str, ...] = ()  # instances that failed it (a retry avoids them)
        self.is_budgeted_retry = False  # counted in the core's retry budget
        self.held_reason = ""  # why its quota last held it in the queue ("" never held)

    @property
    def request_id(self) -> str:
        return self.view.request_id

    def __repr__(self) -> str:
        return f"RequestState({self.view.request_id!r}, {self.status.name}, on={self.instance_id})"
