"""Disaggregation threshold that moves to balance the prefill and decode pools' load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cpsim.types import ExecutionInstanceType, PDSeparationConfig
from cpsim.validation import check_non_negative, check_positive, check_range
from cpsim.views import InstanceView, RequestView
from policies.pd.threshold import pool, pools_available, worth_splitting


@dataclass(frozen=True, slots=True)
class ThresholdMove:
    """One threshold change and the pool loads (outstanding over capacity) that caused it."""

    time_s: float
    from_tokens: int
    to_tokens: int
    prefill_load_frac: float
    decode_load_frac: float


def pool_load_frac(views: Sequence[InstanceView]) -> float:
    """Outstanding requests over capacity, summed over the pool."""
    return sum(v.outstanding for v in views) / sum(v.max_concurrent_requests for v in views)


class AdaptivePDPolicy:
    """Like ``ThresholdPDPolicy``, but before each decision the threshold moves by
    ``step_tokens`` within [``min_threshold_tokens``, ``max_threshold_tokens``]: up (fewer
    prompts split) when the prefill pool's load exceeds the decode pool's by at least
    ``hysteresis``, down (more prefill work taken off the decode instances) when the decode
    pool's exceeds the prefill pool's by as much; at most one move per ``min_interval_s``
    (a dispatch round asks once per queued request at the same time). ``history`` lists
    the moves."""

    name = "adaptive"

    def __init__(
        self,
        threshold_tokens: int = 800,
        min_threshold_tokens: int = 128,
        max_threshold_tokens: int = 8192,
        step_tokens: int = 64,
        hysteresis: float = 0.2,
        min_interval_s: float = 1.0,
    ) -> None:
        check_non_negative("min_threshold_tokens", min_threshold_tokens, integer=True)
        if max_threshold_tokens < min_threshold_tokens:
            raise ValueError(
                f"max_threshold_tokens={max_threshold_tokens} must be >= "
                f"min_threshold_tokens={min_threshold_tokens}"
            )
        check_non_negative("threshold_tokens", threshold_tokens, integer=True)
        check_range(
            "threshold_tokens", threshold_tokens, min_threshold_tokens, max_threshold_tokens
        )
        check_positive("step_tokens", step_tokens, integer=True)
        check_range("hysteresis", hysteresis, 0.0, 1.0)
        check_non_negative("min_interval_s", min_interval_s)
        self.threshold_tokens = threshold_tokens
        self.min_threshold_tokens = min_threshold_tokens
        self.max_threshold_tokens = max_threshold_tokens
        self.step_tokens = step_tokens
        self.hysteresis = hysteresis
        self.min_interval_s = min_interval_s
        self.history: list[ThresholdMove] = []
        self._last_move_s = float("-inf")

    @classmethod
    def from_config(cls, config: PDSeparationConfig) -> AdaptivePDPolicy:
        low, high = config.min_threshold_input_tokens, config.max_threshold_input_tokens
        return cls(
            threshold_tokens=min(high, max(low, config.prefilling_threshold_input_tokens)),
            min_threshold_tokens=low,
            max_threshold_tokens=high,
            step_tokens=config.adaptive_step_tokens,
            hysteresis=config.adaptive_hysteresis,
        )

    def adjust(self, instances: Sequence[InstanceView], now: float) -> None:
        """Move the threshold one step toward balance, if the pools are off by enough."""
        prefill = pool(instances, ExecutionInstanceType.PREFILLING)
        decode = pool(instances, ExecutionInstanceType.DECODING)
        if not prefill or not decode or now - self._last_move_s < self.min_interval_s:
            return
        prefill_load, decode_load = pool_load_frac(prefill), pool_load_frac(decode)
        diff = prefill_load - decode_load
        if abs(diff) < self.hysteresis or diff == 0.0:
            return
        step = self.step_tokens if diff > 0 else -self.step_tokens
        old = self.threshold_tokens
        new = min(self.max_threshold_tokens, max(self.min_threshold_tokens, old + step))
        if new == old:
            return
        self.history.append(ThresholdMove(now, old, new, prefill_load, decode_load))
        self.threshold_tokens = new
        self._last_move_s = now

    def disaggregate(
        self, request: RequestView, instances: Sequence[InstanceView], now: float
    ) -> bool:
        self.adjust(instances, now)
        return worth_splitting(request, self.threshold_tokens) and pools_available(instances)
