"""The serving path of each request, from vLLM's own timestamps: into the engine core, and back.

A request served through the live stack spends time outside any engine step: from the control
plane through AsyncLLM's input processing and IPC into the engine core's scheduler (which takes
requests in only between steps), and from the engine core's output back through the frontend
to the control plane. The profile prices both as per-request delays (``ingress_s``,
``egress_s``), which the simulated replica applies, instead of folding them into step prices.

vLLM timestamps each request in the engine core (``RequestOutput.metrics``: ``queued_ts`` when
the scheduler takes it in, ``first_token_ts`` when its first token is output; monotonic, a
system-wide clock on Linux, so comparable with the frontend's). With the time the control plane
took the request and got its first token:
- ingress = queued - taken, from requests that found the engine idle (else it includes the
  rest of the step in flight);
- egress = first token at the control plane - first token output by the engine core;
- the engine core's own TTFT (first token - queued) is what a lone prompt's step costs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample

#: Columns a request record gains (on the control plane's clock): the engine core took the
#: request into its scheduler, and output its first token.
PATH_COLUMNS = ("engine_queued_s", "engine_first_token_s")
PATH_KIND = "path_"  # the prefix of the path samples' kinds
INGRESS, EGRESS = PATH_KIND + "ingress", PATH_KIND + "egress"


class PathRecorder:
    """Wraps a LocalEngine's ``generate`` to keep the engine core's timestamps of each request
    (``RequestOutput.metrics``: queued, first token; needs vLLM's stats, on in LocalEngine),
    and keeps when the control plane was handed each request (``submit``)."""

    def __init__(self, engine: Any) -> None:
        self.engine_times: dict[str, tuple[float, float]] = {}
        self.submitted: dict[str, float] = {}
        generate = engine.engine.generate
        times = self.engine_times

        async def timed(*args: Any, request_id: str, **kwargs: Any) -> AsyncIterator[Any]:
            async for out in generate(*args, request_id=request_id, **kwargs):
                stats = getattr(out, "metrics", None)
                if request_id not in times and stats is not None and stats.first_token_ts:
                    times[request_id] = (float(stats.queued_ts), float(stats.first_token_ts))
                yield out

        engine.engine.generate = timed

    async def submit(self, manager: Any, metadata: Any) -> str:
        self.submitted[metadata.request_id] = time.monotonic()
        request_id: str = await manager.submit_request(metadata)
        return request_id

    def offset_s(self, records: pd.DataFrame) -> float:
        """Monotonic time minus the control plane's clock (``records`` indexed by request id)."""
        ids = [r for r in records.index if r in self.submitted]
        if not ids:
            raise ValueError("none of these requests went through PathRecorder.submit")
        arrival = records["arrival_time_s"]
        return statistics.median(self.submitted[r] - float(arrival[r]) for r in ids)

    def with_engine_times(self, records: pd.DataFrame, offset_s: float) -> pd.DataFrame:
        """``records`` (indexed by request id) with PATH_COLUMNS on the control plane's clock
        (NaN where the engine reported no first token)."""
        out = records.copy()
        nan = (math.nan, math.nan)
        for column, k in zip(PATH_COLUMNS, (0, 1), strict=True):
            out[column] = [self.engine_times.get(r, nan)[k] - offset_s for r in out.index]
        return out


def path_samples(records: pd.DataFrame) -> list[StepSample]:
    """One ``path_ingress`` sample per request that found nothing else in flight, one
    ``path_egress`` sample per request with a first token (records with PATH_COLUMNS)."""
    arrival = records["arrival_time_s"].to_numpy(float)
    finish = records["finish_time_s"].to_numpy(float)
    ingress = records["engine_queued_s"].to_numpy(float) - arrival
    egress = records["first_token_time_s"].to_numpy(float) - records[
        "engine_first_token_s"].to_numpy(float)
    samples = []
    for i in range(len(records)):
        others = np.arange(len(records)) != i
        alone = not ((arrival[others] < arrival[i]) & (finish[others] > arrival[i])).any()
        if alone and ingress[i] > 0:
            samples.append(StepSample(INGRESS, StepBatch(), float(ingress[i])))
        if egress[i] > 0:
            samples.append(StepSample(EGRESS, StepBatch(), float(egress[i])))
    return samples


def engine_ttft_s(records: pd.DataFrame) -> list[float]:
    """The engine core's own TTFT of each request: first token output - taken in."""
    t = records["engine_first_token_s"].to_numpy(float) - records["engine_queued_s"].to_numpy(float)
    return [float(x) for x in t if x > 0]


def fit_path(samples: Sequence[StepSample]) -> tuple[float, float, dict[str, Any]]:
    """(ingress_s, egress_s, report): the medians of the path samples (0 where there are
    none, as in profiles measured before the path was)."""
    report: dict[str, Any] = {}
    medians = []
    for kind in (INGRESS, EGRESS):
        values = np.array([s.time_s for s in samples if s.kind == kind])
        if values.size == 0:
            medians.append(0.0)
            continue
        medians.append(float(np.median(values)))
        p10, p90 = np.percentile(values, [10, 90])
        report[kind] = {"num_samples": int(values.size), "median_ms": round(medians[-1] * 1e3, 3),
                        "p10_ms": round(float(p10) * 1e3, 3), "p90_ms": round(float(p90) * 1e3, 3)}
    return medians[0], medians[1], report
