"""The profiler's live calibration: served step periods by step shape under Poisson traffic."""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from backends.vllm.profile_measure import ProfileGrid
from backends.vllm.profile_path import PATH_COLUMNS, PathRecorder
from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample
from cpsim.workload import PoissonArrivals, SyntheticWorkload, TraceSampledLengths

#: The live calibration's request lengths (ShareGPT, clipped to the context; not scaled).
LIVE_TRACE = ("sharegpt_derived/sharegpt_8k_filtered_stats_llama2_tokenizer.csv", "sharegpt")


class StepRecorder:
    """Every engine step the frontend hears of (``enable_logging_iteration_details`` on):
    (monotonic time, prefill requests, prefill tokens, decode requests, engine elapsed ms)."""

    def __init__(self, stats: Any) -> None:
        self.steps: list[tuple[float, int, int, int, float]] = []
        record = stats.record

        def recording(scheduler_stats: Any, iteration_stats: Any) -> None:
            record(scheduler_stats, iteration_stats)
            d = getattr(scheduler_stats, "iteration_details", None)
            if d is not None:
                self.steps.append((time.monotonic(), int(d.num_ctx_requests),
                                   int(d.num_ctx_tokens), int(d.num_generation_requests),
                                   float(d.elapsed_ms)))

        stats.record = recording


def live_step_samples(steps: list[tuple[float, int, int, int, float]], records: Any,
                      offset_s: float, min_steps: int = 3) -> list[StepSample]:
    """Served step periods of a live run, as means over steps of one shape (a request's
    TPOT is a mean over its steps, so the occasional slow step counts).

    A step's period is the time from the previous step's output to its own at the frontend
    (steps after an idle engine are left out). Its decode context is the requests decoding
    then (first token before, finish after), each at prompt + the tokens it had by then
    (interpolated), scaled to the engine's count; prefill chunks are taken as fresh
    prompts. Shapes: decode requests (exact to 16, then by 4) and prefill tokens (by 256)."""
    first = records["first_token_time_s"].to_numpy(float) + offset_s
    finish = records["finish_time_s"].to_numpy(float) + offset_s
    arrival = records["arrival_time_s"].to_numpy(float) + offset_s
    prompt = records["num_prompt_tokens"].to_numpy(float)
    output = records["num_output_tokens"].to_numpy(float)
    bins: dict[tuple[int, int], list[tuple[float, StepBatch]]] = {}
    for prev, cur in itertools.pairwise(steps):
        t, num_pre, pre_tokens, num_dec, _ = cur
        if not ((arrival <= prev[0]) & (finish > prev[0] + 1e-4)).any():
            continue  # the engine idled before this step
        ctx = 0
        if num_dec:
            on = (first < t) & (finish >= t)
            if not on.any():
                continue
            progress = (t - first[on]) / np.maximum(finish[on] - first[on], 1e-9)
            mean = float(np.mean(prompt[on] + 1 + progress * np.maximum(output[on] - 1, 0)))
            ctx = round(mean * num_dec)
        batch = StepBatch(pre_tokens, pre_tokens * pre_tokens // max(num_pre, 1), 0, num_pre,
                          num_dec, ctx)
        key = (num_dec if num_dec <= 16 else 16 + 4 * ((num_dec - 13) // 4), -(-pre_tokens // 256))
        bins.setdefault(key, []).append((t - prev[0], batch))
    samples = []
    for (_, pre_bin), items in sorted(bins.items()):
        if len(items) < min_steps:
            continue
        n = len(items)
        means = [round(sum(getattr(b, f) for _, b in items) / n) for f in StepBatch._fields]
        samples.append(StepSample("serving_live_mixed" if pre_bin else "serving_live_decode",
                                  StepBatch(*means), statistics.fmean(p for p, _ in items), n))
    return samples


#: The request record columns a live run keeps (to rebuild its samples in a refit).
RECORD_COLUMNS = ("arrival_time_s", "first_token_time_s", "finish_time_s", "num_prompt_tokens",
                  "num_output_tokens")


@dataclass(frozen=True)
class LiveRun:
    """One live calibration run: the engine steps the frontend heard of (StepRecorder's
    tuples), the requests' records and the offset from record times to step times."""

    rate_rps: float
    steps: list[tuple[float, int, int, int, float]]
    records: pd.DataFrame
    offset_s: float

    def samples(self) -> list[StepSample]:
        return live_step_samples(self.steps, self.records, self.offset_s)

    def to_dict(self) -> dict[str, Any]:
        columns = [c for c in (*RECORD_COLUMNS, *PATH_COLUMNS) if c in self.records]
        return {"rate_rps": self.rate_rps, "offset_s": self.offset_s,
                "steps": [list(s) for s in self.steps],
                "records": {c: self.records[c].astype(float).tolist() for c in columns}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LiveRun:
        steps = [(float(t), int(a), int(b), int(c), float(e)) for t, a, b, c, e in data["steps"]]
        return cls(float(data["rate_rps"]), steps, pd.DataFrame(data["records"]),
                   float(data["offset_s"]))


async def measure_live(manager: Any, recorder: StepRecorder, grid: ProfileGrid, rate_rps: float,
                       path: PathRecorder | None = None) -> LiveRun:
    """Poisson arrivals (``rate_rps``, seed ``live_seed``, ShareGPT lengths) through the
    live stack; its steps and request records (``LiveRun.samples``: the served step
    periods by step shape), with the engine core's times of each request (PATH_COLUMNS)
    when ``path`` records them."""
    workload = SyntheticWorkload(PoissonArrivals(rate_rps),
                                 lengths=TraceSampledLengths(*LIVE_TRACE),
                                 num_requests=grid.live_num_requests, max_context_tokens=2048,
                                 id_prefix=f"live{rate_rps:g}-")
    requests = list(workload.requests(grid.live_seed))
    recorder.steps.clear()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    submitted = 0.0
    for arrival_s, meta in requests:
        delay = t0 + arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        submitted = submitted or time.monotonic()
        if path is None:
            await manager.submit_request(meta)
        else:
            await path.submit(manager, meta)
    ids = [m.request_id for _, m in requests]
    for rid in ids:
        await manager.wait_for_request(rid, 1800.0)
    rec = manager.get_request_records().set_index("request_id").loc[ids]
    offset = submitted - float(rec["arrival_time_s"].iloc[0])
    columns = list(RECORD_COLUMNS)
    if path is not None:
        rec = path.with_engine_times(rec, offset)  # the same clocks as the steps'
        columns += PATH_COLUMNS
    run = LiveRun(rate_rps, list(recorder.steps), rec[columns].reset_index(drop=True), offset)
    print(f"  live calibration at {rate_rps:g} req/s: {len(recorder.steps)} steps, "
          f"{len(run.samples())} step shapes "
          f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return run
