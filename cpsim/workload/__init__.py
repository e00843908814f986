"""Workloads: seeded, lazy streams of (arrival_s, RequestMetadata), synthetic or replayed."""

from cpsim.workload.arrivals import (
    ArrivalProcess,
    DiurnalArrivals,
    GammaArrivals,
    OnOffArrivals,
    PoissonArrivals,
    RampArrivals,
)
from cpsim.workload.emit import TimedRequest
from cpsim.workload.lengths import (
    FixedLengths,
    IndependentPairLengths,
    LengthDistribution,
    LogNormalLengths,
    PairLengths,
    TraceSampledLengths,
    UniformLengths,
    clip_to_context,
)
from cpsim.workload.mix import RequestMix
from cpsim.workload.trace_workload import TraceArrivals, TraceWorkload
from cpsim.workload.traces import (
    TRACE_FORMATS,
    TraceTable,
    default_trace_dir,
    load_trace,
    resolve_trace_path,
)
from cpsim.workload.workload import SyntheticWorkload, Workload

__all__ = [
    "TRACE_FORMATS",
    "ArrivalProcess",
    "DiurnalArrivals",
    "FixedLengths",
    "GammaArrivals",
    "IndependentPairLengths",
    "LengthDistribution",
    "LogNormalLengths",
    "OnOffArrivals",
    "PairLengths",
    "PoissonArrivals",
    "RampArrivals",
    "RequestMix",
    "SyntheticWorkload",
    "TimedRequest",
    "TraceArrivals",
    "TraceSampledLengths",
    "TraceTable",
    "TraceWorkload",
    "UniformLengths",
    "Workload",
    "clip_to_context",
    "default_trace_dir",
    "load_trace",
    "resolve_trace_path",
]
