"""KV balance: move decodes from instances about to run out of KV cache to roomy ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cpsim.types import ExecutionInstanceType
from cpsim.validation import check_positive, check_range
from cpsim.views import DecodeView, InstanceView

_DECODES = (ExecutionInstanceType.GENERAL, ExecutionInstanceType.DECODING)


class KVBalancePolicy:
    """Llumnix's rebalancing, in its simplest form. An instance's *virtual usage* is the
    KV share of its decodes plus, for each request waiting in its engine, one average
    decode's share (what the queue will need, as Llumnix counts queued requests); above
    ``high_usage`` it is a source, at or below ``low_usage`` a target. The fullest source
    is paired with the emptiest target, and the source's shortest decodes (the cheapest to
    copy) that have at least ``min_remaining_tokens`` to go move until the two usages would
    cross, at most ``max_per_pair`` at a time; then the next pair. Runs every
    ``interval_s``."""

    name = "kv_balance"

    def __init__(
        self,
        high_usage: float = 0.9,
        low_usage: float = 0.6,
        min_remaining_tokens: int = 32,
        max_per_pair: int = 4,
        interval_s: float = 1.0,
    ) -> None:
        check_range("high_usage", high_usage, 0.0, 10.0)
        check_range("low_usage", low_usage, 0.0, high_usage)
        check_positive("min_remaining_tokens", min_remaining_tokens, integer=True)
        check_positive("max_per_pair", max_per_pair, integer=True)
        check_positive("interval_s", interval_s)
        self.high_usage = high_usage
        self.low_usage = low_usage
        self.min_remaining_tokens = min_remaining_tokens
        self.max_per_pair = max_per_pair
        self.interval_s = interval_s

    def usage(self, instance: InstanceView, decodes: Sequence[DecodeView]) -> float:
        """Virtual usage: the decodes' KV share plus one average share per waiting request."""
        held = sum(d.kv_frac for d in decodes)
        if not decodes or not instance.num_waiting:
            return held
        return held + instance.num_waiting * held / len(decodes)

    def plan(
        self,
        instances: Sequence[InstanceView],
        decoding: Mapping[str, Sequence[DecodeView]],
        now: float,
    ) -> list[tuple[str, str]]:
        usage = {
            v.instance_id: self.usage(v, decoding.get(v.instance_id, ()))
            for v in instances
            if v.is_healthy and v.instance_type in _DECODES
        }
        sources = sorted((u, i) for i, u in usage.items() if u > self.high_usage)
        targets = sorted((u, i) for i, u in usage.items() if u <= self.low_usage)
        moves: list[tuple[str, str]] = []
        for (_, source), (_, target) in zip(reversed(sources), targets, strict=False):
            movable = sorted(
                (
                    d
                    for d in decoding.get(source, ())
                    if d.num_remaining_tokens >= self.min_remaining_tokens
                ),
                key=lambda d: d.num_context_tokens,
            )
            src, dst = usage[source], usage[target]
            for decode in movable[: self.max_per_pair]:
                if src - decode.kv_frac < dst + decode.kv_frac:
                    break  # one more would tip the balance the other way
                moves.append((decode.request_id, target))
                src -= decode.kv_frac
                dst += decode.kv_frac
        return moves
