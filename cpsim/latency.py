"""Latency prediction for policies, and the step pricing that the simulator's profiles do."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from cpsim.protocols import LatencyEstimate, LatencyModel
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import InstanceView, RequestView

__all__ = [
    "LatencyEstimate",
    "LatencyModel",
    "ObservedLatencyModel",
    "StepBatch",
    "StepLatencyModel",
    "frontend_costs_s",
    "request_path_s",
]


class StepBatch(NamedTuple):
    """What one engine step computes, as the features a latency model prices.

    prefill: tokens computed this step for requests still in prefill (chunks), the sum of
    squared chunk lengths, and the tokens of context the chunks attend to (cached or
    computed in earlier chunks); decode: sequences producing one token each and the
    total context those sequences attend to. A NamedTuple (immutable like a frozen
    dataclass, several times cheaper to build): the simulator prices one per step."""

    num_prefill_tokens: int = 0
    sum_sq_prefill_tokens: int = 0
    prefill_context_tokens: int = 0
    num_prefill_seqs: int = 0
    num_decode_seqs: int = 0
    decode_context_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return self.num_prefill_tokens == 0 and self.num_decode_seqs == 0


@runtime_checkable
class StepLatencyModel(Protocol):
    """Prices one engine step. Implementations are per (model, hardware, tp, pp)."""

    def step_time_s(self, batch: StepBatch) -> float: ...


def request_path_s(model: object) -> tuple[float, float]:
    """(ingress_s, egress_s) of a step-pricing model: the serving path of each request into
    the engine core and of its outputs back (``ProfiledLatencyModel``); (0, 0) for models
    that price steps only."""
    return float(getattr(model, "ingress_s", 0.0)), float(getattr(model, "egress_s", 0.0))


def frontend_costs_s(model: object) -> tuple[float, float]:
    """(request_s, stream_s) of a step-pricing model's frontend: the time its one input queue
    spends on each request before the engine core takes it, and its one output queue on each
    request's token of a step before the client sees it (``Calibration``); (0, 0) where the
    model has none. Unlike ``request_path_s``, these are queues: they add more under load."""
    return (float(getattr(model, "frontend_request_s", 0.0)),
            float(getattr(model, "frontend_stream_s", 0.0)))


class ObservedLatencyModel:
    """Predicts from what the control plane observed on the instance: recent TTFT and
    TPOT moving averages, scaled up by the work queued ahead; defaults until observed.

    TTFT grows with the prompt tokens already waiting for prefill on the instance, at
    ``prefill_tokens_per_s``; a fresh instance gets ``default_ttft_ms`` and
    ``default_tpot_ms``."""

    def __init__(
        self,
        default_ttft_ms: float = 200.0,
        default_tpot_ms: float = 30.0,
        prefill_tokens_per_s: float = 10_000.0,
    ) -> None:
        check_non_negative("default_ttft_ms", default_ttft_ms)
        check_non_negative("default_tpot_ms", default_tpot_ms)
        check_positive("prefill_tokens_per_s", prefill_tokens_per_s)
        self.default_ttft_ms = default_ttft_ms
        self.default_tpot_ms = default_tpot_ms
        self.prefill_tokens_per_s = prefill_tokens_per_s

    def predict(self, request: RequestView, instance: InstanceView) -> LatencyEstimate:
        ttft_ms = instance.recent_ttft_ms
        base_ttft_s = (self.default_ttft_ms if ttft_ms is None else ttft_ms) / 1000.0
        ahead_s = (
            instance.pending_prefill_tokens + request.num_prompt_tokens
        ) / self.prefill_tokens_per_s
        tpot_ms = instance.recent_tpot_ms
        tpot_s = (self.default_tpot_ms if tpot_ms is None else tpot_ms) / 1000.0
        return LatencyEstimate(ttft_s=base_ttft_s + ahead_s, tpot_s=tpot_s)
