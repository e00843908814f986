"""What one simulated engine step does (StepPlan) and what it produced (StepOutcome).

Both are NamedTuples: immutable like frozen dataclasses and about 3x cheaper to build, and the
replica builds one or two per step."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from backends.sim.request import SimRequest
from cpsim.latency import StepBatch


class StepPlan(NamedTuple):
    """The replica's answer to ``schedule()``, as vLLM's SchedulerOutput: who runs how many tokens.

    ``chunks`` are requests scheduled one by one (prefill chunks, first decode steps, or every
    request when the step needs exact ordering); ``bulk_decode_ids`` are the decoding requests
    advanced together by one token each. ``batch`` holds the features a latency model prices."""

    step_index: int
    chunks: tuple[tuple[SimRequest, int], ...]
    bulk_decode_ids: tuple[str, ...]
    new_request_ids: tuple[str, ...]
    preempted_ids: tuple[str, ...]
    batch: StepBatch

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.bulk_decode_ids

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        """Tokens scheduled this step per request id (built on demand)."""
        out = dict.fromkeys(self.bulk_decode_ids, 1)
        for req, num in self.chunks:
            out[req.request_id] = num
        return out

    @property
    def total_num_scheduled_tokens(self) -> int:
        return len(self.bulk_decode_ids) + sum(num for _, num in self.chunks)


class StepOutcome(NamedTuple):
    """What a step (or a run of pure decode steps) produced.

    ``new_token_counts`` maps each request id to output tokens produced (first tokens included):
    ``bulk_steps`` tokens each for ``bulk_ids`` (the bulk decode set), then ``token_counts``
    (requests scheduled one by one); it is built on demand, as only per-step token reports
    read it. ``first_token_ids`` produced their first output token; ``finished`` are requests
    that generated their last token (their stats final); ``preempted_ids`` were preempted when
    the step was scheduled."""

    num_steps: int = 1
    first_token_ids: tuple[str, ...] = ()
    token_counts: Mapping[str, int] = MappingProxyType({})
    finished: tuple[SimRequest, ...] = ()
    preempted_ids: tuple[str, ...] = ()
    bulk_ids: tuple[str, ...] = ()
    bulk_steps: int = 0

    @property
    def new_token_counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.bulk_ids, self.bulk_steps)
        out.update(self.token_counts)
        return out
