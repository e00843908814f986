"""Simulator speed: simulated requests per wall second and peak memory, per size and cluster.

Each configuration runs in a fresh subprocess (so its peak RSS is its own): OPT-13B replicas on
A100-80GB (the published vLLM profile), FIFO + load-balanced routing, Azure 2023 conversation
lengths sampled with replacement, Poisson arrivals at ``--load`` of the cluster's capacity.
Capacity per replica is calibrated first by saturating one replica (or given by
``--capacity-rps``). The ``build`` column says whether the simulator's hot modules ran as pure
Python or compiled (``CPSIM_MYPYC=1 pip install -e .``, see ``cpsim/compiled.py``)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRACE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
PROFILE = "vllm-opt-13b-a100-80gb-tp1"
MAX_CONTEXT_TOKENS = 2048  # OPT-13B's context window
COLUMNS = (
    "build",
    "requests",
    "replicas",
    "rate_rps",
    "wall_s",
    "sim_req_per_s",
    "cpu_s",
    "sim_req_per_cpu_s",
    "sim_time_s",
    "completed",
    "peak_in_flight",
    "base_rss_mb",
    "peak_rss_run_mb",
    "peak_rss_mb",
    "rss_growth_mb",
)


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _simulation(num_replicas: int, spill_dir: str | None, record_series: bool) -> Any:
    from backends.sim.cluster import ClusterSimulation, ReplicaSpec
    from backends.sim.kv_capacity import num_kv_blocks
    from backends.sim.replica import ReplicaConfig
    from cpsim.core import ControlPlane
    from cpsim.metrics import MetricsCollector
    from cpsim.models import load_model_spec
    from cpsim.profiles import load_profile
    from cpsim.types import ExecutionInstance
    from policies.routing.load_balanced import LoadBalancedRouter
    from policies.scheduling.fifo import FIFOPolicy

    profile = load_profile(PROFILE)
    model = load_model_spec("opt-13b")
    specs = []
    for i in range(num_replicas):
        inst = ExecutionInstance(
            instance_id=f"a100-{i}",
            model_name="opt-13b",
            gpu_type="A100-80GB",
            gpu_memory_gb=80.0,
            cost_per_gpu_hour=4.10,
            max_concurrent_requests=256,
        )
        config = ReplicaConfig.from_instance(inst)
        blocks = num_kv_blocks(model, 80.0, 1, 1, config.block_size, config.gpu_memory_utilization)
        specs.append(ReplicaSpec(inst, profile, model, blocks, config))
    core = ControlPlane(
        FIFOPolicy(), LoadBalancedRouter(), metrics=MetricsCollector(spill_dir=spill_dir)
    )
    return ClusterSimulation(
        specs, core, scrape_interval_s=0.5, record_series=record_series, progress=False
    )


def _workload(num_requests: int, rate_rps: float) -> Any:
    from cpsim.workload import PoissonArrivals, SyntheticWorkload, TraceSampledLengths

    return SyntheticWorkload(
        arrival=PoissonArrivals(rate_rps),
        lengths=TraceSampledLengths(TRACE, "azure"),
        num_requests=num_requests,
        max_context_tokens=MAX_CONTEXT_TOKENS,
    )


def run_one(
    num_requests: int, num_replicas: int, rate_rps: float, spill_dir: str | None, seed: int = 0
) -> dict[str, Any]:
    """One configuration in this process: the result row (RSS figures of this process)."""
    sim = _simulation(num_replicas, spill_dir, record_series=False)
    workload = _workload(num_requests, rate_rps)
    workload.pair_lengths.table  # noqa: B018  (read the trace before the baseline)
    base_rss = _rss_mb()
    peak = {"in_flight": 0, "rss": base_rss}
    cp = sim.cp

    def watched(stream: Iterator[Any]) -> Iterator[Any]:
        for n, item in enumerate(stream):
            active = cp.num_active
            if active > peak["in_flight"]:
                peak["in_flight"] = active
            if n % 4096 == 0:
                peak["rss"] = max(peak["rss"], _rss_mb())
            yield item
        peak["rss"] = max(peak["rss"], _rss_mb())

    cpu0 = time.process_time()
    result = sim.run(watched(workload.requests(seed)))
    cpu_s = time.process_time() - cpu0
    peak_rss = _rss_mb("VmHWM")
    return {
        "build": build_kind(),
        "requests": num_requests,
        "replicas": num_replicas,
        "rate_rps": round(rate_rps, 3),
        "wall_s": round(result.wall_time_s, 2),
        "sim_req_per_s": round(num_requests / result.wall_time_s),
        "cpu_s": round(cpu_s, 2),
        "sim_req_per_cpu_s": round(num_requests / cpu_s),
        "sim_time_s": round(result.sim_time_s, 1),
        "completed": result.metrics.completed_requests,
        "peak_in_flight": peak["in_flight"],
        "base_rss_mb": round(base_rss, 1),
        "peak_rss_run_mb": round(peak["rss"], 1),
        "peak_rss_mb": round(peak_rss, 1),
        "rss_growth_mb": round(peak["rss"] - base_rss, 1),
    }


def build_kind() -> str:
    """``python``, ``mypyc`` (all of ``cpsim.compiled.MODULES`` compiled) or ``partial``."""
    from cpsim.compiled import build_in_use, stale_modules

    stale = stale_modules()
    if stale:
        raise RuntimeError(f"stale compiled modules {stale}: rebuild before measuring")
    return build_in_use()


def calibrate_capacity_rps(num_requests: int = 3000, seed: int = 0) -> float:
    """Completions per second of one saturated replica, over the middle half of its finishes
    (start-up and drain left out)."""
    sim = _simulation(1, None, record_series=False)
    result = sim.run(_workload(num_requests, 1000.0).requests(seed))
    done = result.requests[result.requests["status"] == "COMPLETED"]
    finish = done["finish_time_s"].sort_values().to_numpy()
    lo, hi = len(finish) // 4, 3 * len(finish) // 4
    return float((hi - lo) / (finish[hi] - finish[lo]))


def _child(args: argparse.Namespace) -> None:
    requests, replicas, rate = args.child.split(",")
    spill = None
    if args.spill_dir:
        spill = tempfile.mkdtemp(prefix=f"sim-speed-{requests}x{replicas}-", dir=args.spill_dir)
    row = run_one(int(requests), int(replicas), float(rate), spill, args.seed)
    print("RESULT " + json.dumps(row), flush=True)


def _spawn(requests: int, replicas: int, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", f"{requests},{replicas},{rate}"]
    cmd += ["--seed", str(args.seed)]
    if args.spill_dir:
        cmd += ["--spill-dir", args.spill_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{requests} x {replicas} failed with exit code {proc.returncode}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    row: dict[str, Any] = json.loads(line[len("RESULT "):])
    return row


def _markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", default="10000,100000", help="comma-separated counts")
    parser.add_argument("--replicas", default="1,8", help="comma-separated replica counts")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity")
    parser.add_argument("--capacity-rps", type=float, default=None,
                        help="per-replica capacity (req/s); calibrated when not given")
    parser.add_argument("--spill-dir", default=None, help="write records to parquet here")
    parser.add_argument("--out", default=None, help="CSV path (a .md table is written beside)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    if args.spill_dir:
        os.makedirs(args.spill_dir, exist_ok=True)
    capacity = args.capacity_rps
    if capacity is None:
        t0 = time.perf_counter()
        capacity = calibrate_capacity_rps(seed=args.seed)
        print(f"calibrated capacity: {capacity:.3f} req/s per replica "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    rows = []
    for requests in (int(x) for x in args.requests.split(",")):
        for replicas in (int(x) for x in args.replicas.split(",")):
            rate = args.load * capacity * replicas
            row = _spawn(requests, replicas, rate, args)
            rows.append(row)
            print(" ".join(f"{c}={row[c]}" for c in COLUMNS), flush=True)
    print()
    print(_markdown(rows))
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        Path(args.out).with_suffix(".md").write_text(_markdown(rows) + "\n")


if __name__ == "__main__":
    main()
