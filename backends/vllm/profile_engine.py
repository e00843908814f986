"""The profiler's in-process measurement: single LLMEngine steps on batches it builds."""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from backends.vllm.profile_measure import ForeignCpu, ProfileGrid
from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample


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
