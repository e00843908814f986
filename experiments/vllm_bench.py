"""Reads the result file of vLLM's own serving benchmark (``vllm bench serve --save-result
--save-detailed``, or ``benchmarks/benchmark_serving.py`` before it) as a per-request log for
``experiments.replay``: a fleet's own measurement replayed in the simulator as it was sent.

The file is one JSON object: the run's settings (``request_rate``, ``burstiness``,
``max_concurrency``, ``ramp_up_strategy``) and, per request in the order the client sent them,
``input_lens``, ``output_lens``, ``ttfts`` and ``itls`` (seconds), ``errors`` and, from 2026
(vllm-project/vllm#32667), ``start_times``: when each request was sent. Earlier files do not
say when a request was sent; their send times can be regenerated, because the client drew
them from NumPy's global generator seeded with its ``--seed`` (default 0), in one of two ways:

- ``sequential`` (up to mid-2025): request 0 at once, then after each request one gamma
  interval (shape ``burstiness``, mean 1 / ``request_rate``) before the next. Checked against
  a published server log of vLLM 0.8.3 (``data/published/llm-k8s-llama33-70b-a100``);
- ``normalized`` (from vllm-project/vllm#21108, July 2025): one gamma interval per request,
  summed, and scaled so that the last request is sent at n / ``request_rate``. Checked
  against the send times the client of vLLM 0.32 records (tests/vllm/test_gateway_vllm.py).

Either holds only where nothing else drew from that generator before the schedule (in the
versions read, the ShareGPT and random datasets did not; a run with other datasets may have).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SCHEDULES = ("sequential", "normalized")
PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls")


def is_result(data: Any) -> bool:
    """Whether parsed JSON is a vLLM benchmark result with its per-request lists."""
    return isinstance(data, dict) and all(key in data for key in PER_REQUEST)


def client_arrivals(n: int, rate: float, burstiness: float, seed: int, schedule: str) -> np.ndarray:
    """The benchmark client's send times (s from the first request) under ``schedule``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: use one of {SCHEDULES}")
    if not rate > 0:
        raise ValueError(f"request_rate {rate!r}: a send schedule needs a rate > 0")
    if not burstiness > 0:
        raise ValueError(f"burstiness {burstiness!r}: must be > 0")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.RandomState(seed)  # the legacy global generator, seeded as the client did

    def draw() -> float:
        if math.isinf(burstiness):
            return 1.0 / rate
        return float(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))

    if schedule == "sequential":
        gaps = [draw() for _ in range(n - 1)]
        return np.concatenate([[0.0], np.cumsum(gaps)])
    sent = np.cumsum([draw() for _ in range(n)])
    sent *= (n / rate) / sent[-1]
    return sent - sent[0]


def _rate(value: Any) -> float:
    return math.inf if value in (None, "inf", "Infinity") else float(value)


def send_times(result: dict[str, Any], path: Path, schedule: str | None, seed: int) -> np.ndarray:
    """When each request was sent (s; the log is rebased to its first request): recorded,
    all at once, or regenerated."""
    n = len(result["ttfts"])
    if result.get("start_times"):
        return np.asarray(result["start_times"], dtype=float)
    rate = _rate(result.get("request_rate"))
    if result.get("ramp_up_strategy") or result.get("max_concurrency"):
        what = "a ramp-up" if result.get("ramp_up_strategy") else "a concurrency limit"
        raise ValueError(
            f"{path}: this run had {what} and its file has no start_times, so when each "
            "request was sent cannot be regenerated; replay a run with start_times (vLLM "
            "from 2026) or a per-request log with send times"
        )
    if math.isinf(rate):
        return np.zeros(n)
    if schedule is None:
        raise ValueError(
            f"{path}: no start_times (vLLM saved them from 2026 on); regenerate the client's "
            f"send times at request_rate={rate:g} with --vllm-schedule, one of {SCHEDULES} "
            "(sequential: vLLM up to mid-2025; normalized: from July 2025), and --vllm-seed "
            "(the client's --seed, default 0)"
        )
    return client_arrivals(n, rate, float(result.get("burstiness") or 1.0), seed, schedule)


def read_result(
    path: Path, result: dict[str, Any], schedule: str | None = None, seed: int = 0
) -> tuple[pd.DataFrame, int]:
    """The result's successful requests as log rows in the file's order (arrival_s, prompt,
    output, ttft_ms, tpot_ms; TPOT as vLLM computes it, (latency - TTFT) / (output - 1);
    ``experiments.replay.read_log`` sorts them and rebases arrival_s to the first), and how
    many failed requests were left out."""
    lengths = {key: len(result[key]) for key in PER_REQUEST}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: per-request lists of different lengths: {lengths}")
    if not result["ttfts"]:
        raise ValueError(f"{path}: no requests in it")
    sent = send_times(result, path, schedule, seed)
    n = len(sent)
    errors = result.get("errors") or [""] * n
    latencies = result.get("latencies")
    rows = []
    for i in range(n):
        ttft, output = result["ttfts"][i], int(result["output_lens"][i])
        if errors[i] or not ttft or output < 1:
            continue
        decode_s = latencies[i] - ttft if latencies else float(sum(result["itls"][i]))
        rows.append({
            "arrival_s": float(sent[i]),
            "prompt": int(result["input_lens"][i]),
            "output": output,
            "ttft_ms": 1e3 * float(ttft),
            "tpot_ms": 1e3 * decode_s / (output - 1) if output > 1 else math.nan,
        })  # fmt: skip
    if not rows:
        raise ValueError(f"{path}: none of its {n} requests succeeded")
    return pd.DataFrame(rows), n - len(rows)
