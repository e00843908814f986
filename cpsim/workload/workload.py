"""The Workload protocol and SyntheticWorkload: a lazy, seeded stream of timed requests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cpsim.validation import check_positive
from cpsim.workload.arrivals import DEFAULT_BATCH_SIZE, ArrivalProcess
from cpsim.workload.emit import TimedRequest, emit_batch
from cpsim.workload.lengths import (
    IndependentPairLengths,
    LengthDistribution,
    PairLengths,
    clip_to_context,
)
from cpsim.workload.mix import RequestMix

#: Samples behind the mean-length estimate when a context clip makes it not closed-form.
ESTIMATE_SAMPLES = 1 << 16


@runtime_checkable
class Workload(Protocol):
    """A recipe for requests. ``requests(seed)`` yields (arrival_s, request) with nondecreasing
    arrival_s, lazily; the same seed gives the same stream. The ``mean_*`` estimates (None
    where unknown) let experiments set load as a fraction of capacity."""

    @property
    def mean_rate_rps(self) -> float | None: ...

    @property
    def mean_prompt_tokens(self) -> float | None: ...

    @property
    def mean_output_tokens(self) -> float | None: ...

    def requests(self, seed: int | np.random.Generator) -> Iterator[TimedRequest]: ...

    def describe(self) -> dict[str, Any]: ...


def spawn_streams(seed: int | np.random.Generator, count: int) -> list[np.random.Generator]:
    """Independent generators per concern (arrivals, lengths, mix, ...), so that changing one
    part of a workload leaves the random draws of the others unchanged."""
    if isinstance(seed, np.random.Generator):
        return seed.spawn(count)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


@dataclass(frozen=True)
class SyntheticWorkload:
    """Arrivals from ``arrival``; lengths from ``lengths`` (joint pairs) or from the
    ``prompt_lengths`` and ``output_lengths`` marginals; attributes from ``mix``.

    Ends after ``num_requests`` or at ``duration_s`` seconds, whichever comes first; with
    neither, it lasts as long as the arrival process (forever for stationary ones: consumers
    stop it). Prompt + output fit in
    ``max_context_tokens`` when given (see ``clip_to_context``).
    """

    arrival: ArrivalProcess
    prompt_lengths: LengthDistribution | None = None
    output_lengths: LengthDistribution | None = None
    mix: RequestMix = field(default_factory=RequestMix)
    num_requests: int | None = None
    duration_s: float | None = None
    lengths: PairLengths | None = None
    max_context_tokens: int | None = None
    id_prefix: str = "req-"
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        marginals = (self.prompt_lengths, self.output_lengths)
        if self.lengths is None and None in marginals:
            raise ValueError(
                "lengths=None needs both prompt_lengths and output_lengths; got "
                f"prompt_lengths={self.prompt_lengths!r}, output_lengths={self.output_lengths!r}"
            )
        if self.lengths is not None and marginals != (None, None):
            raise ValueError(
                "give either lengths (joint pairs) or prompt_lengths + output_lengths, not both"
            )
        if self.num_requests is not None:
            check_positive("num_requests", self.num_requests, integer=True)
        if self.duration_s is not None:
            check_positive("duration_s", self.duration_s)
        if self.max_context_tokens is not None:
            check_positive("max_context_tokens", self.max_context_tokens, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)

    @property
    def pair_lengths(self) -> PairLengths:
        if self.lengths is not None:
            return self.lengths
        assert self.prompt_lengths is not None and self.output_lengths is not None
        return IndependentPairLengths(self.prompt_lengths, self.output_lengths)

    @property
    def mean_rate_rps(self) -> float | None:
        return self.arrival.mean_rate_rps

    @cached_property
    def _mean_lengths(self) -> tuple[float, float]:
        pairs = self.pair_lengths
        if self.max_context_tokens is None:
            return pairs.expected_prompt_tokens, pairs.expected_output_tokens
        rng = np.random.default_rng(0)
        prompt, output = clip_to_context(
            *pairs.sample_pairs(rng, ESTIMATE_SAMPLES), self.max_context_tokens
        )
        return float(prompt.mean()), float(output.mean())

    @property
    def mean_prompt_tokens(self) -> float:
        return self._mean_lengths[0]

    @property
    def mean_output_tokens(self) -> float:
        return self._mean_lengths[1]

    def requests(self, seed: int | np.random.Generator) -> Iterator[TimedRequest]:
        arrival_rng, length_rng, mix_rng = spawn_streams(seed, 3)
        pairs = self.pair_lengths
        emitted = 0
        for batch in self.arrival.batches(arrival_rng, self.batch_size):
            times = batch
            if self.duration_s is not None:
                times = times[: int(np.searchsorted(times, self.duration_s, side="right"))]
            if self.num_requests is not None:
                times = times[: self.num_requests - emitted]
            if times.size:
                prompt, output = clip_to_context(
                    *pairs.sample_pairs(length_rng, int(times.size)), self.max_context_tokens
                )
                yield from emit_batch(
                    emitted, self.id_prefix, times, prompt, output, self.mix, mix_rng
                )
                emitted += int(times.size)
            if times.size < batch.size or emitted == self.num_requests:
                return

    def describe(self) -> dict[str, Any]:
        return {
            "workload": "synthetic",
            "arrival": self.arrival.describe(),
            "lengths": self.pair_lengths.describe(),
            "mix": self.mix.describe(),
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "max_context_tokens": self.max_context_tokens,
        }
