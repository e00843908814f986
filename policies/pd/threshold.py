"""Disaggregate prompts at or above a fixed token threshold when both PD pools are up."""

from __future__ import annotations

from collections.abc import Sequence

from cpsim.types import ExecutionInstanceType, PDSeparationConfig
from cpsim.validation import check_non_negative
from cpsim.views import InstanceView, RequestView


def pool(instances: Sequence[InstanceView], kind: ExecutionInstanceType) -> list[InstanceView]:
    """The healthy instances of one type."""
    return [v for v in instances if v.is_healthy and v.instance_type is kind]


def pools_available(instances: Sequence[InstanceView]) -> bool:
    """At least one healthy PREFILLING and one healthy DECODING instance."""
    return bool(pool(instances, ExecutionInstanceType.PREFILLING)) and bool(
        pool(instances, ExecutionInstanceType.DECODING)
    )


def worth_splitting(request: RequestView, threshold_tokens: int) -> bool:
    """Long enough prompt, and a decode phase to hand off to (more than one output token)."""
    return request.num_prompt_tokens >= threshold_tokens and request.max_tokens > 1


class ThresholdPDPolicy:
    """Disaggregate when the prompt has at least ``threshold_tokens`` tokens, more than one
    output token is asked for, and a healthy prefill and a healthy decode instance exist."""

    name = "threshold"

    def __init__(self, threshold_tokens: int = 800) -> None:
        check_non_negative("threshold_tokens", threshold_tokens, integer=True)
        self.threshold_tokens = threshold_tokens

    @classmethod
    def from_config(cls, config: PDSeparationConfig) -> ThresholdPDPolicy:
        return cls(threshold_tokens=config.prefilling_threshold_input_tokens)

    def disaggregate(
        self, request: RequestView, instances: Sequence[InstanceView], now: float
    ) -> bool:
        return worth_splitting(request, self.threshold_tokens) and pools_available(instances)
