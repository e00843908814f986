"""The real engine's speed at the time of each fidelity run, against its profile.

On a shared machine the real engine's speed drifts (on the 2-core VM of docs/fidelity.md by
10-40 % between runs minutes apart), more than the fidelity target. So the report runs a small
fixed workload, the probe, through the same live stack before each real run and after the
last, and simulates the same probe with the profile. The probe's mean end-to-end latency,
real over simulated, is the engine's speed relative to its profile at that moment (above 1:
slower than profiled). A run's factor is the geometric mean of the probes on either side of
it. The report gives each run's errors as measured and, beside them, with the profile scaled
by the run's factor (``ProfiledLatencyModel.scaled``): what is left there is the model's own
error, with the machine's drift taken out. The probe is one shape (a few requests of the
workload's mean lengths, sent together), so the factor is a single number per run; a drift
that hits some step shapes more than others is not taken out."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from cpsim.types import RequestMetadata


@dataclass(frozen=True)
class ProbeShape:
    """``num_requests`` requests of ``prompt_tokens`` and ``output_tokens``, sent together."""

    num_requests: int = 4
    prompt_tokens: int = 900
    output_tokens: int = 200

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")

    def requests(self, tag: str) -> list[tuple[float, RequestMetadata]]:
        """The probe's requests, all at time 0; ids (hence prompts) unique to ``tag``, so
        no probe hits another's prefix cache."""
        return [
            (0.0, RequestMetadata(f"probe-{tag}-{i}", max_tokens=self.output_tokens,
                                  num_prompt_tokens=self.prompt_tokens))
            for i in range(self.num_requests)
        ]


def mean_latency_ms(records: pd.DataFrame) -> float:
    """Mean end-to-end latency of a probe's requests; every one must have completed."""
    status = records["status"].astype(str).str.upper()
    if len(records) == 0 or not status.str.contains("COMPLETED").all():
        raise RuntimeError(f"a probe request did not complete: {sorted(set(status))}")
    return float(records["latency_ms"].astype(float).mean())


@dataclass(frozen=True)
class Probe:
    """One probe: taken before the run ``before`` ("end": after the last run)."""

    before: str
    date: str
    real_ms: float
    sim_ms: float

    @property
    def ratio(self) -> float:
        return self.real_ms / self.sim_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], sim_ms: float | None = None) -> Probe:
        """A saved probe; ``sim_ms`` replaces the saved one (re-simulated with a new profile)."""
        return cls(str(data["before"]), str(data["date"]), float(data["real_ms"]),
                   float(data["sim_ms"] if sim_ms is None else sim_ms))


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run_factors(probes: Sequence[Probe], labels: Sequence[str]) -> dict[str, float]:
    """Each run's speed factor: the geometric mean of the probe just before it and the next
    one (the probe before the next run, or the closing one)."""
    order = [p.before for p in probes]
    if order != [*labels, "end"]:
        raise ValueError(f"probes taken before {order}; expected one before each of "
                         f"{list(labels)} and one at the end")
    return {label: math.sqrt(probes[i].ratio * probes[i + 1].ratio)
            for i, label in enumerate(labels)}
