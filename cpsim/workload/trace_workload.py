"""Trace replay: TraceWorkload (timestamps, lengths, prefix blocks) and TraceArrivals."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from cpsim.validation import check_non_negative, check_positive, check_range
from cpsim.workload.arrivals import ArrivalProcess, FloatArray
from cpsim.workload.emit import TimedRequest, emit_batch
from cpsim.workload.lengths import clip_to_context
from cpsim.workload.mix import RequestMix
from cpsim.workload.traces import IntArray, TraceTable, load_trace
from cpsim.workload.workload import spawn_streams

#: Tokens per Mooncake ``hash_ids`` block.
PREFIX_BLOCK_SIZE_TOKENS = 512


@dataclass(frozen=True)
class TraceArrivals:
    """The timestamps of a trace as an arrival process, times multiplied by ``time_scale``
    (0.5 = twice as fast); e.g. Azure arrival times for ShareGPT lengths."""

    path: str
    format: str = "auto"
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        check_positive("time_scale", self.time_scale)

    @cached_property
    def times_s(self) -> FloatArray:
        table = load_trace(self.path, self.format)
        if table.arrival_s is None:
            raise ValueError(f"path={self.path!r}: a {table.format} trace has no timestamps")
        return table.arrival_s * self.time_scale

    @property
    def mean_rate_rps(self) -> float | None:
        times = self.times_s
        span_s = float(times[-1] - times[0])
        return (times.size - 1) / span_s if span_s > 0 else None

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]:
        times = self.times_s
        for start in range(0, times.size, batch_size):
            yield times[start : start + batch_size]

    def describe(self) -> dict[str, Any]:
        return {"arrival": "trace", "path": self.path, "time_scale": self.time_scale}


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which trace rows are replayed, and when (None: times come from ``arrival``)."""

    rows: IntArray
    times_s: FloatArray | None


@dataclass(frozen=True)
class TraceWorkload:
    """Replays a trace file (a relative ``path`` is inside ``default_trace_dir()``).

    Rows whose trace time lies in [``start_s``, ``start_s + duration_s``) are kept, each with
    probability ``sample_frac`` (deterministic per seed), up to ``max_requests``. Arrival =
    (trace time - ``start_s``) x ``time_scale`` (0.5 = twice as fast); ``rate_rps`` instead
    rescales the kept rows to that mean rate. ``arrival`` replaces the trace's times (and is
    required for lengths-only traces such as ShareGPT). ``max_tokens`` = the output length
    (generated in full, like ignore_eos), ``num_prompt_tokens`` = the input length, Mooncake
    ``hash_ids`` -> ``prefix_block_ids`` (cut to the blocks a clipped prompt still covers).
    """

    path: str
    format: str = "auto"
    time_scale: float = 1.0
    rate_rps: float | None = None
    sample_frac: float = 1.0
    max_requests: int | None = None
    start_s: float = 0.0
    duration_s: float | None = None
    max_context_tokens: int | None = None
    arrival: ArrivalProcess | None = None
    mix: RequestMix = field(default_factory=RequestMix)
    id_prefix: str = "req-"
    batch_size: int = 4096

    def __post_init__(self) -> None:
        check_positive("time_scale", self.time_scale)
        if self.rate_rps is not None:
            check_positive("rate_rps", self.rate_rps)
            if self.time_scale != 1.0:
                raise ValueError(
                    f"rate_rps={self.rate_rps} and time_scale={self.time_scale}: give at most one"
                )
        if self.arrival is not None and (self.rate_rps is not None or self.time_scale != 1.0):
            raise ValueError("rate_rps and time_scale apply to trace times; not with arrival=")
        check_range("sample_frac", self.sample_frac, 0.0, 1.0)
        if self.sample_frac <= 0:
            raise ValueError(f"sample_frac={self.sample_frac} is not allowed; must be in (0, 1]")
        if self.max_requests is not None:
            check_positive("max_requests", self.max_requests, integer=True)
        check_non_negative("start_s", self.start_s)
        if self.duration_s is not None:
            check_positive("duration_s", self.duration_s)
        if self.max_context_tokens is not None:
            check_positive("max_context_tokens", self.max_context_tokens, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)

    @cached_property
    def table(self) -> TraceTable:
        """The whole trace, read on first use (building the workload reads nothing)."""
        return load_trace(self.path, self.format)

    def _window_rows(self) -> IntArray:
        table = self.table
        rows = np.arange(len(table), dtype=np.int64)
        if self.start_s == 0 and self.duration_s is None:
            return rows
        if table.arrival_s is None:
            raise ValueError(
                f"start_s={self.start_s}, duration_s={self.duration_s}: the {table.format} trace "
                f"{table.path} has no timestamps to window"
            )
        end_s = np.inf if self.duration_s is None else self.start_s + self.duration_s
        return rows[(table.arrival_s >= self.start_s) & (table.arrival_s < end_s)]

    def _plan(self, rng: np.random.Generator) -> _Plan:
        rows = self._window_rows()
        if self.sample_frac < 1.0:
            rows = rows[rng.random(rows.size) < self.sample_frac]
        if self.max_requests is not None:
            rows = rows[: self.max_requests]
        if rows.size == 0:
            raise ValueError(
                f"start_s={self.start_s}, duration_s={self.duration_s}, sample_frac="
                f"{self.sample_frac} select no rows of {self.table.path}"
            )
        if self.arrival is not None:
            return _Plan(rows, None)
        stamps = self.table.arrival_s
        if stamps is None:
            raise ValueError(
                f"the {self.table.format} trace {self.table.path} has no timestamps; "
                "give arrival= (e.g. PoissonArrivals) to time its requests"
            )
        times = stamps[rows] - self.start_s
        scale = self.time_scale
        if self.rate_rps is not None and rows.size > 1:
            span_s = float(times[-1] - times[0])
            scale = (rows.size - 1) / (span_s * self.rate_rps) if span_s > 0 else 1.0
        return _Plan(rows, times * scale)

    @cached_property
    def _estimate(self) -> tuple[float | None, float, float]:
        """(rate, prompt, output) means of the seed-0 selection (exact when sample_frac = 1)."""
        plan = self._plan(np.random.default_rng(0))
        prompt, output = clip_to_context(
            self.table.prompt_tokens[plan.rows],
            self.table.output_tokens[plan.rows],
            self.max_context_tokens,
        )
        if plan.times_s is None:
            rate = self.arrival.mean_rate_rps if self.arrival is not None else None
        else:
            span_s = float(plan.times_s[-1] - plan.times_s[0]) if plan.times_s.size else 0.0
            rate = (plan.times_s.size - 1) / span_s if span_s > 0 else None
        return rate, float(prompt.mean()), float(output.mean())

    @property
    def mean_rate_rps(self) -> float | None:
        return self._estimate[0]

    @property
    def mean_prompt_tokens(self) -> float:
        return self._estimate[1]

    @property
    def mean_output_tokens(self) -> float:
        return self._estimate[2]

    def _batch_times(self, plan: _Plan, arrival_rng: np.random.Generator) -> Iterator[FloatArray]:
        if plan.times_s is not None:
            for start in range(0, plan.times_s.size, self.batch_size):
                yield plan.times_s[start : start + self.batch_size]
        elif self.arrival is not None:
            yield from self.arrival.batches(arrival_rng, self.batch_size)

    def _blocks(self, rows: IntArray, prompt: IntArray) -> list[tuple[int, ...] | None] | None:
        hash_ids = self.table.hash_ids
        if hash_ids is None:
            return None
        keep = (-(-prompt // PREFIX_BLOCK_SIZE_TOKENS)).tolist()
        return [hash_ids[r][:k] or None for r, k in zip(rows.tolist(), keep, strict=True)]

    def requests(self, seed: int | np.random.Generator) -> Iterator[TimedRequest]:
        select_rng, arrival_rng, mix_rng = spawn_streams(seed, 3)
        plan = self._plan(select_rng)
        table = self.table
        done = 0
        for times in self._batch_times(plan, arrival_rng):
            take = times[: plan.rows.size - done]
            rows = plan.rows[done : done + take.size]
            prompt, output = clip_to_context(
                table.prompt_tokens[rows], table.output_tokens[rows], self.max_context_tokens
            )
            blocks = self._blocks(rows, prompt)
            yield from emit_batch(
                done, self.id_prefix, take, prompt, output, self.mix, mix_rng, blocks
            )
            done += int(take.size)
            if done >= plan.rows.size:
                return

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workload": "trace", "path": self.path, "format": self.format}
        for name in ("time_scale", "rate_rps", "sample_frac", "max_requests", "start_s"):
            out[name] = getattr(self, name)
        out["duration_s"] = self.duration_s
        out["max_context_tokens"] = self.max_context_tokens
        if self.arrival is not None:
            out["arrival"] = self.arrival.describe()
        out["mix"] = self.mix.describe()
        return out
