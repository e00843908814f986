"""The profiler's serving measurement: decode periods, lone TTFTs and live steps via cpsim."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from backends.vllm.profile_live import LiveRun, StepRecorder, measure_live
from backends.vllm.profile_measure import ProfileGrid
from backends.vllm.profile_path import PathRecorder, engine_ttft_s, path_samples
from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample
from cpsim.types import ExecutionInstance, RequestMetadata


async def _serving(engine_args: dict[str, Any], grid: ProfileGrid, live_runs: list[LiveRun]
                   ) -> list[StepSample]:
    from backends.vllm.async_engine import AsyncLLMBackend
    from cpsim.manager import ControlPlaneManager

    backend = AsyncLLMBackend(engine_args=engine_args | {"enable_logging_iteration_details": True})
    manager = ControlPlaneManager("fifo", "round_robin", enable_monitoring=False, backend=backend)
    manager.register_instance(ExecutionInstance("profiled", max_concurrent_requests=1 << 20))
    await manager.start()
    recorder = StepRecorder(backend.local_engine("profiled").stats)
    path = PathRecorder(backend.local_engine("profiled"))
    path_records: list[pd.DataFrame] = []
    counter = iter(range(1 << 30))

    async def run(count: int, prompt: int, out: int
                  ) -> tuple[list[float], list[float], pd.DataFrame]:
        """TPOTs (last to get its first token first), the engine core's own TTFTs
        (profile_path.engine_ttft_s) and the records of ``count`` requests."""
        ids = [await path.submit(manager, RequestMetadata(
            f"s{next(counter)}", max_tokens=out, num_prompt_tokens=prompt)) for _ in range(count)]
        for rid in ids:
            await manager.wait_for_request(rid, 600.0)
        rec = manager.get_request_records().set_index("request_id").loc[ids]
        rec = path.with_engine_times(rec, path.offset_s(rec))
        ordered = rec.sort_values("first_token_time_s", ascending=False)
        return list(ordered["tpot_ms"] / 1e3), engine_ttft_s(ordered), rec

    # The engine core and worker are other processes here, so foreign CPU cannot be told
    # apart from ours: each point is the median of ``repeats`` runs (the load is recorded).
    samples = []
    prompt, out = grid.serving_prompt_tokens, grid.serving_output_tokens
    await run(8, prompt, 8)
    for count in grid.serving_batch_sizes:
        periods = [statistics.median((await run(count, prompt, out))[0])
                   for _ in range(grid.repeats)]
        batch = StepBatch(num_decode_seqs=count, decode_context_tokens=count * (prompt + out // 2))
        samples.append(StepSample("serving_decode", batch, statistics.median(periods),
                                  len(periods)))
        print(f"  serving decode B={count:4d}: {samples[-1].time_s * 1e3:8.2f} ms/step "
              f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    # Long contexts: prompts take several prefill steps, so only the request that got its
    # first token last decodes in a batch of ``count`` throughout (the others' TPOT holds
    # mixed steps); it prices how the serving path scales with the engine step.
    long_prompt = grid.serving_long_prompt_tokens
    for count in grid.serving_long_batch_sizes:
        periods = [(await run(count, long_prompt, out))[0][0] for _ in range(grid.repeats)]
        batch = StepBatch(num_decode_seqs=count,
                          decode_context_tokens=count * (long_prompt + out // 2))
        samples.append(StepSample("serving_decode", batch, statistics.median(periods),
                                  len(periods)))
        print(f"  serving decode B={count:4d} context {long_prompt}: "
              f"{samples[-1].time_s * 1e3:8.2f} ms/step (load {os.getloadavg()[0]:.2f})",
              file=sys.stderr, flush=True)
    async def lone_ttft(length: int) -> float:
        await asyncio.sleep(grid.serving_idle_gap_s)  # arrivals find the engine idle
        _, ttfts, rec = await run(1, length, 1)
        # the serving path is sampled on lone prompts and live runs, whose traffic is like
        # served traffic, not on the lockstep batches
        path_records.append(rec)
        return ttfts[0]

    for length in grid.serving_ttft_prompts_tokens:
        ttfts = [await lone_ttft(length) for _ in range(grid.repeats)]
        samples.append(StepSample("serving_ttft", StepBatch(length, length * length, 0, 1),
                                  statistics.median(ttfts), len(ttfts)))
        print(f"  engine-core TTFT of a lone {length}-token prompt: "
              f"{samples[-1].time_s * 1e3:.2f} ms", file=sys.stderr, flush=True)
    for rate in grid.live_rates_rps if grid.live_num_requests else ():
        live = await measure_live(manager, recorder, grid, rate, path)
        live_runs.append(live)
        samples += live.samples()
        path_records.append(live.records)
    await manager.stop()
    for rec in path_records:
        samples += path_samples(rec)
    return samples


def measure_serving(engine_args: dict[str, Any], grid: ProfileGrid, vocab: int,
                    live_out: Path | None = None) -> list[StepSample]:
    """Decode periods (TPOT), lone-prompt TTFTs and the step periods of a short Poisson run
    through the live stack of cpsim: a ControlPlaneManager (fifo, round_robin) over an
    AsyncLLMBackend, as the fidelity run. The live runs' raw steps and request records go
    to ``live_out`` (JSON) when given, for refits that rebuild the live samples."""
    live_runs: list[LiveRun] = []
    samples = asyncio.run(_serving(engine_args, grid, live_runs))
    if live_out is not None:
        live_out.write_text(json.dumps([run.to_dict() for run in live_runs]))
    return samples
