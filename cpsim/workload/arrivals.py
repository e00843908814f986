"""Arrival processes: absolute arrival times in seconds, produced lazily in numpy batches."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np

from cpsim.validation import check_non_negative, check_positive

#: Arrivals produced per batch; large enough to amortise numpy calls, small enough to be lazy.
DEFAULT_BATCH_SIZE = 4096

FloatArray: TypeAlias = np.ndarray[Any, np.dtype[np.float64]]


@runtime_checkable
class ArrivalProcess(Protocol):
    """A point process on [0, inf): ``batches`` yields nondecreasing absolute times in seconds.

    The stream may be infinite (stationary processes) or end (a trace, a ramp down to 0 rps);
    consumers stop it by count or by time. Same ``rng`` state -> same times.
    """

    @property
    def mean_rate_rps(self) -> float | None: ...

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]: ...

    def describe(self) -> dict[str, Any]: ...


def _renewal_batches(gaps: Any, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]:
    """Cumulative sums of i.i.d. gaps drawn by ``gaps(rng, n)``, carried across batches."""
    offset_s = 0.0
    while True:
        times = offset_s + np.cumsum(gaps(rng, batch_size))
        offset_s = float(times[-1])
        yield times


@dataclass(frozen=True)
class PoissonArrivals:
    """Poisson arrivals: exponential inter-arrival times with mean 1 / ``rate_rps`` (CV = 1)."""

    rate_rps: float

    def __post_init__(self) -> None:
        check_positive("rate_rps", self.rate_rps)

    @property
    def mean_rate_rps(self) -> float:
        return float(self.rate_rps)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]:
        scale_s = 1.0 / self.rate_rps
        return _renewal_batches(lambda r, n: r.exponential(scale_s, n), rng, batch_size)

    def describe(self) -> dict[str, Any]:
        return {"arrival": "poisson", "rate_rps": self.rate_rps}


@dataclass(frozen=True)
class GammaArrivals:
    """Renewal arrivals with Gamma inter-arrival times: mean 1 / ``rate_rps``, coefficient of
    variation ``cv`` (1 = Poisson, > 1 bursty, < 1 more regular)."""

    rate_rps: float
    cv: float

    def __post_init__(self) -> None:
        check_positive("rate_rps", self.rate_rps)
        check_positive("cv", self.cv)

    @property
    def mean_rate_rps(self) -> float:
        return float(self.rate_rps)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]:
        shape = 1.0 / (self.cv * self.cv)
        scale_s = 1.0 / (self.rate_rps * shape)
        return _renewal_batches(lambda r, n: r.gamma(shape, scale_s, n), rng, batch_size)

    def describe(self) -> dict[str, Any]:
        return {"arrival": "gamma", "rate_rps": self.rate_rps, "cv": self.cv}


@dataclass(frozen=True)
class OnOffArrivals:
    """Bursts: alternating ON and OFF periods with exponential durations (means ``mean_on_s``,
    ``mean_off_s``); Poisson at ``rate_on_rps`` while ON and ``rate_off_rps`` (often 0) while
    OFF. Starts in an ON period."""

    rate_on_rps: float
    mean_on_s: float
    mean_off_s: float
    rate_off_rps: float = 0.0

    def __post_init__(self) -> None:
        check_positive("rate_on_rps", self.rate_on_rps)
        check_non_negative("rate_off_rps", self.rate_off_rps)
        check_positive("mean_on_s", self.mean_on_s)
        check_positive("mean_off_s", self.mean_off_s)

    @property
    def mean_rate_rps(self) -> float:
        on, off = self.mean_on_s, self.mean_off_s
        return (self.rate_on_rps * on + self.rate_off_rps * off) / (on + off)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]:
        # Enough ON/OFF cycles per batch for about ``batch_size`` arrivals on average.
        per_cycle = self.rate_on_rps * self.mean_on_s + self.rate_off_rps * self.mean_off_s
        num_cycles = max(1, min(batch_size, math.ceil(batch_size / max(per_cycle, 1e-9))))
        rates = np.tile([self.rate_on_rps, self.rate_off_rps], num_cycles)
        means = np.tile([self.mean_on_s, self.mean_off_s], num_cycles)
        start_s = 0.0
        while True:
            durations = rng.exponential(means)
            ends = start_s + np.cumsum(durations)
            starts = ends - durations
            counts = rng.poisson(rates * durations)
            offsets = rng.random(int(counts.sum())) * np.repeat(durations, counts)
            times = np.sort(np.repeat(starts, counts) + offsets)
            start_s = float(ends[-1])
            if times.size:
                yield times

    def describe(self) -> dict[str, Any]:
        return {
            "arrival": "on_off",
            "rate_on_rps": self.rate_on_rps,
            "rate_off_rps": self.rate_off_rps,
            "mean_on_s": self.mean_on_s,
            "mean_off_s": self.mean_off_s,
        }


@dataclass(frozen=True)
class RampArrivals:
    """Non-homogeneous Poisson whose rate moves linearly from ``start_rate_rps`` to
    ``end_rate_rps`` over ``ramp_s`` seconds and stays at ``end_rate_rps`` after (the stream
    ends there when that is 0). Exact, by time-rescaling a unit-rate Poisson process."""

    start_rate_rps: float
    end_rate_rps: float
    ramp_s: float

    def __post_init__(self) -> None:
        check_non_negative("start_rate_rps", self.start_rate_rps)
        check_non_negative("end_rate_rps", self.end_rate_rps)
        check_positive("ramp_s", self.ramp_s)
        if self.start_rate_rps == 0 and self.end_rate_rps == 0:
            raise ValueError(
                "start_rate_rps=0 and end_rate_rps=0 is not allowed; at least one must be > 0"
            )

    @property
    def mean_rate_rps(self) -> float:
        """Mean over the ramp itself."""
        return 0.5 * (self.start_rate_rps + self.end_rate_rps)

    def rate_at(self, t_s: float) -> float:
        frac = min(max(t_s / self.ramp_s, 0.0), 1.0)
        return self.start_rate_rps + (self.end_rate_rps - self.start_rate_rps) * frac

    def _invert(self, work: FloatArray) -> FloatArray:
        """Time t with cumulative intensity Lambda(t) = ``work`` (unit-rate arrival epochs)."""
        r0, r1, ramp_s = self.start_rate_rps, self.end_rate_rps, self.ramp_s
        slope = (r1 - r0) / ramp_s
        ramp_work = 0.5 * (r0 + r1) * ramp_s
        # Root of slope/2 t^2 + r0 t = work, in the form that is stable for slope -> 0.
        inside = 2.0 * work / (r0 + np.sqrt(np.maximum(r0 * r0 + 2.0 * slope * work, 0.0)))
        after = ramp_s + (work - ramp_work) / r1 if r1 > 0 else np.full_like(work, np.inf)
        return np.where(work <= ramp_work, inside, after)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]:
        for work in _renewal_batches(lambda r, n: r.exponential(1.0, n), rng, batch_size):
            times = self._invert(work)
            finite = times[np.isfinite(times)]
            if finite.size:
                yield finite
            if finite.size < times.size:
                return

    def describe(self) -> dict[str, Any]:
        return {
            "arrival": "ramp",
            "start_rate_rps": self.start_rate_rps,
            "end_rate_rps": self.end_rate_rps,
            "ramp_s": self.ramp_s,
        }


@dataclass(frozen=True)
class DiurnalArrivals:
    """Non-homogeneous Poisson with a daily rhythm: the rate moves as a cosine between
    ``trough_rps`` (at time 0 and every ``period_s``) and ``peak_rps`` (half a period in), a
    day compressed into ``period_s``. Exact, by thinning a Poisson stream at the peak rate."""

    trough_rps: float
    peak_rps: float
    period_s: float

    def __post_init__(self) -> None:
        check_non_negative("trough_rps", self.trough_rps)
        check_positive("peak_rps", self.peak_rps)
        check_positive("period_s", self.period_s)
        if self.peak_rps < self.trough_rps:
            raise ValueError(
                f"peak_rps={self.peak_rps} is below trough_rps={self.trough_rps}; the peak "
                "must be the larger"
            )

    @property
    def mean_rate_rps(self) -> float:
        return 0.5 * (self.trough_rps + self.peak_rps)

    def rate_at(self, t_s: float | FloatArray) -> Any:
        phase = np.cos(2.0 * np.pi * np.asarray(t_s) / self.period_s)
        return self.trough_rps + (self.peak_rps - self.trough_rps) * 0.5 * (1.0 - phase)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[FloatArray]:
        peak = self.peak_rps
        for times in _renewal_batches(lambda r, n: r.exponential(1.0 / peak, n), rng, batch_size):
            kept = times[rng.random(times.size) * peak < self.rate_at(times)]
            if kept.size:
                yield kept

    def describe(self) -> dict[str, Any]:
        return {
            "arrival": "diurnal",
            "trough_rps": self.trough_rps,
            "peak_rps": self.peak_rps,
            "period_s": self.period_s,
        }
