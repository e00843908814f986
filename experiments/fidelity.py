"""Fidelity report: one workload on a real vLLM engine and in the simulator, errors per rate.

    python -m experiments.fidelity --profile vllm-cpu-tiny-llama-tp1 --out outputs/fidelity

The real side is one AsyncLLM engine behind cpsim's live stack (ControlPlaneManager, fifo,
round_robin, AsyncLLMBackend); the simulated side is ClusterSimulation with the same
instance mirrored (conf/cluster) and the measured profile. A burst run measures saturation
first; then Poisson runs at fractions of it. The simulator replays the arrival times the
real run actually produced, so arrival jitter is not counted as model error. A small fixed
probe before each run and after the last measures how fast the engine is at the time against
its profile; the errors are also given with the profile scaled by that factor
(``experiments/fidelity_probe.py``), which takes the machine's drift out of them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import yaml

from backends.sim.cluster import ClusterSimulation
from backends.vllm.async_engine import AsyncLLMBackend
from backends.vllm.engine_args import TINY_MODEL_DIR
from backends.vllm.local_engine import LocalEngine, start_local_engine
from backends.vllm.profile_measure import wait_for_quiet
from cpsim.core import ControlPlane
from cpsim.manager import ControlPlaneManager
from cpsim.profiles import ProfiledLatencyModel, load_profile
from cpsim.types import ExecutionInstance, RequestMetadata
from cpsim.workload import PoissonArrivals, RequestMix, SyntheticWorkload, TraceSampledLengths
from cpsim.workload.traces import IntArray
from experiments.build import build_instances, build_replicas
from experiments.fidelity_probe import Probe, ProbeShape, mean_latency_ms, now_iso, run_factors
from experiments.fidelity_tables import compare, plot_cdfs, summarize, write_tables
from policies.routing.round_robin import RoundRobinRouter
from policies.scheduling.fifo import FIFOPolicy

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "conf" / "cluster" / "sim_tiny_llama_cpu.yaml"
SHAREGPT = "sharegpt_derived/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"


@dataclass(frozen=True)
class ScaledPairLengths:
    """(prompt, output) pairs of ``base`` times ``scale`` (at least 1 token each)."""

    base: TraceSampledLengths
    scale: float

    @property
    def expected_prompt_tokens(self) -> float:
        return self.base.expected_prompt_tokens * self.scale

    @property
    def expected_output_tokens(self) -> float:
        return self.base.expected_output_tokens * self.scale

    def sample_pairs(self, rng: np.random.Generator, n: int) -> tuple[IntArray, IntArray]:
        prompt, output = self.base.sample_pairs(rng, n)
        scaled = (np.maximum(1, np.rint(x * self.scale)).astype(np.int64) for x in (prompt, output))
        return next(scaled), next(scaled)

    def describe(self) -> dict[str, Any]:
        return {"lengths": "scaled", "scale": self.scale, "base": self.base.describe()}


def workload(rate_rps: float, num: int, args: argparse.Namespace, prefix: str
             ) -> list[tuple[float, RequestMetadata]]:
    """Poisson arrivals (rate 0: all at once) with ShareGPT lengths scaled and clipped."""
    lengths = ScaledPairLengths(TraceSampledLengths(args.trace, args.trace_format),
                                args.length_scale)
    w = SyntheticWorkload(PoissonArrivals(rate_rps if rate_rps > 0 else 1e9), lengths=lengths,
                          mix=RequestMix(priorities={"normal": 1.0}), num_requests=num,
                          max_context_tokens=args.max_context_tokens, id_prefix=prefix)
    return list(w.requests(args.seed))


def load_cluster(path: Path) -> dict[str, Any]:
    cluster: dict[str, Any] = yaml.safe_load(path.read_text())
    return cluster


def engine_args_of(cluster: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """The real engine's scheduler settings, taken from the mirrored cluster config."""
    replica = cluster.get("replica", {})
    keys = ("max_num_batched_tokens", "max_num_seqs", "block_size", "enable_prefix_caching",
            "enable_chunked_prefill")
    return {"model": model_dir, **{k: replica[k] for k in keys if k in replica}}


# ---------------------------------------------------------------------- real engine
async def run_real(engine: LocalEngine, instance: ExecutionInstance,
                   requests: Sequence[tuple[float, RequestMetadata]]) -> pd.DataFrame:
    """Replay ``requests`` in wall time through a fresh control plane over ``engine``."""
    backend = AsyncLLMBackend(engines={instance.instance_id: engine})
    manager = ControlPlaneManager("fifo", "round_robin", enable_monitoring=False,
                                  backend=backend)
    manager.register_instance(instance)
    await manager.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for arrival_s, meta in requests:
        delay = t0 + arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await manager.submit_request(meta)
    await manager.drain(timeout_s=1800.0)
    records = manager.get_request_records()
    await manager.stop()
    return records


# ---------------------------------------------------------------------- simulator
def run_sim(cluster: dict[str, Any], profile: ProfiledLatencyModel,
            requests: Sequence[tuple[float, RequestMetadata]]) -> pd.DataFrame:
    specs = build_replicas(cluster, profile, pd_enabled=False)
    blocks = cluster.get("replica", {}).get("num_gpu_blocks")
    if blocks is not None:  # the engine's reported count (experiments/build.py ignores it)
        specs = [dataclasses.replace(s, num_gpu_blocks=int(blocks)) for s in specs]
    core = ControlPlane(FIFOPolicy(), RoundRobinRouter())
    sim = ClusterSimulation(specs, core, record_series=False, progress=False)
    return sim.run(iter(requests), total=len(requests)).requests


def simulate_probe(cluster: dict[str, Any], profile: ProfiledLatencyModel,
                   shape: ProbeShape) -> float:
    """The probe's mean end-to-end latency in the simulator with ``profile`` (ms)."""
    return mean_latency_ms(run_sim(cluster, profile, shape.requests("sim")))


def real_arrivals(records: pd.DataFrame, requests: Sequence[tuple[float, RequestMetadata]]
                  ) -> list[tuple[float, RequestMetadata]]:
    """The requests at the times the real control plane received them (from 0)."""
    when = records.set_index("request_id")["arrival_time_s"]
    t0 = float(when.min())
    timed = [(float(when[m.request_id]) - t0, m) for _, m in requests]
    return sorted(timed, key=lambda x: x[0])


# ---------------------------------------------------------------------- main
class Run(NamedTuple):
    """One real run and its simulation; ``requests`` is what the simulator was given (the
    requests at the real arrival times), so a re-simulation takes the same input."""

    label: str
    rate_rps: float
    load_frac: float
    real: pd.DataFrame
    sim: pd.DataFrame
    requests: list[tuple[float, RequestMetadata]]


def simulated_run(label: str, rate: float, frac: float, real: pd.DataFrame,
                  requests: list[tuple[float, RequestMetadata]], cluster: dict[str, Any],
                  profile: ProfiledLatencyModel) -> Run:
    return Run(label, rate, frac, real, run_sim(cluster, profile, requests), requests)


def requests_of(records: pd.DataFrame) -> list[tuple[float, RequestMetadata]]:
    """A real run's requests at the times they arrived (to re-simulate a saved run)."""
    t0 = float(records["arrival_time_s"].min())
    return sorted(((float(r.arrival_time_s) - t0, RequestMetadata(
        str(r.request_id), max_tokens=int(r.num_output_tokens),
        num_prompt_tokens=int(r.num_prompt_tokens))) for r in records.itertuples()),
        key=lambda x: x[0])


def resimulate(args: argparse.Namespace, cluster: dict[str, Any], profile: ProfiledLatencyModel,
               out: Path) -> pd.DataFrame:
    """Only the simulated side again, over the real records saved in ``args.reuse_real``."""
    saved = Path(args.reuse_real)
    old = pd.read_csv(saved / "fidelity.csv").drop_duplicates("run").set_index("run")
    runs = []
    for label in old.index:
        real = pd.read_parquet(saved / f"real-{label}.parquet")
        runs.append(simulated_run(label, float(old.rate_rps[label]), float(old.load_frac[label]),
                                  real, requests_of(real), cluster, profile))
    meta = json.loads((saved / "fidelity.json").read_text())
    probes: list[Probe] = []
    if meta.get("probes"):  # the real probes again, against this profile's simulation of them
        shape = ProbeShape(**meta["probe_shape"])
        sim_ms = simulate_probe(cluster, profile, shape)
        probes = [Probe.from_dict(p, sim_ms) for p in meta["probes"]]
    meta.setdefault("real_run_profile_date", meta.get("profile_date"))
    meta["profile_date"] = profile.provenance.get("date")
    meta["resimulated_with"] = str(args.profile)
    meta["reused_real"] = str(saved)
    meta["resimulated_date"] = now_iso()
    return report(runs, out, meta, cluster, profile, probes)


def report(runs: list[Run], out: Path,
           meta: dict[str, Any], cluster: dict[str, Any], profile: ProfiledLatencyModel,
           probes: Sequence[Probe] = ()) -> pd.DataFrame:
    """Records, the tables, the CDF plot and the run's facts under ``out``; with probes,
    also each run simulated with the profile scaled by the engine's speed at the time."""
    rows = []
    adjusted_rows: list[dict[str, Any]] = []
    factors = run_factors(probes, [run.label for run in runs]) if probes else {}
    for label, rate, frac, real, sim, requests in runs:
        rows += compare(label, rate, frac, real, sim)
        real.assign(run=label).to_parquet(out / f"real-{label}.parquet", index=False)
        sim.assign(run=label).to_parquet(out / f"sim-{label}.parquet", index=False)
        if label in factors:  # the same input as ``sim``, on the scaled profile
            scaled = run_sim(cluster, profile.scaled(factors[label]), requests)
            scaled.assign(run=label).to_parquet(out / f"sim-adjusted-{label}.parquet",
                                                index=False)
            adjusted_rows += [row | {"speed_factor": round(factors[label], 4)}
                              for row in compare(label, rate, frac, real, scaled)]
    if probes:
        meta["probes"] = [p.to_dict() for p in probes]
        meta["speed_factors"] = {k: round(v, 4) for k, v in factors.items()}
    note = f"{meta.get('resimulated_with') or meta.get('args', {}).get('profile')} " + (
        f"(measured {meta.get('profile_date')}); real runs {meta.get('date', '?')}: "
        f"`{meta.get('command', '?')}`")
    if "reused_real" in meta:
        note += f"; re-simulated {meta['resimulated_date']} over {meta['reused_real']}"
    table = write_tables(rows, out, note, adjusted_rows, probes)
    plot_cdfs([(f"{r.label} ({r.rate_rps:.1f} rps)" if r.rate_rps else r.label, r.real, r.sim)
               for r in runs],
              out / "fidelity_cdf.png")
    (out / "fidelity.json").write_text(json.dumps(meta, indent=1, default=str))
    print((out / "fidelity.md").read_text())
    return table


async def fidelity(args: argparse.Namespace) -> pd.DataFrame:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = load_cluster(Path(args.cluster))
    profile = load_profile(args.profile)
    if args.reuse_real:
        return resimulate(args, cluster, profile, out)
    instance = build_instances(cluster, pd_enabled=False)[0]
    load = wait_for_quiet(args.max_load, args.max_wait_s)
    shape = None if args.no_probe else ProbeShape(
        args.probe_requests, args.probe_prompt_tokens, args.probe_output_tokens)
    probe_sim_ms = simulate_probe(cluster, profile, shape) if shape else 0.0
    engine = await start_local_engine(engine_args_of(cluster, str(args.model_dir)))
    started = time.monotonic()
    runs: list[Run] = []
    probes: list[Probe] = []
    loads = []

    async def probe(before: str) -> None:
        if shape is not None:
            date = now_iso()
            real_ms = mean_latency_ms(await run_real(engine, instance, shape.requests(before)))
            probes.append(Probe(before, date, real_ms, probe_sim_ms))
            print(f"probe before {before}: {probes[-1].ratio:.3f} x the profile", flush=True)

    try:
        if shape is not None:  # untimed: a fresh engine's first requests are slower
            await run_real(engine, instance, shape.requests("warmup"))
        await probe("saturation")
        burst = workload(0.0, args.saturation_requests, args, "sat-")
        real = await run_real(engine, instance, burst)
        saturation = summarize(real)["throughput_rps"]
        runs.append(simulated_run("saturation", 0.0, 1.0, real, real_arrivals(real, burst),
                                  cluster, profile))
        print(f"saturation: {saturation:.2f} req/s", flush=True)
        rates = args.rates or [f * saturation for f in args.rate_fracs]
        for i, rate in enumerate(rates):
            await probe(f"poisson-{i}")
            reqs = workload(rate, args.num_requests, args, f"r{i}-")
            before = os.getloadavg()[0]
            real = await run_real(engine, instance, reqs)
            loads.append((round(rate, 3), before, os.getloadavg()[0]))
            runs.append(simulated_run(f"poisson-{i}", rate, rate / saturation, real,
                                      real_arrivals(real, reqs), cluster, profile))
            print(f"rate {rate:.2f} req/s done", flush=True)
        await probe("end")
    finally:
        await engine.shutdown()
    meta = {"command": "python -m experiments.fidelity " + " ".join(sys.argv[1:]),
            "date": now_iso(),
            "args": {k: str(v) for k, v in vars(args).items()}, "load_before": load,
            "load_1min_per_run (rate, before, after)": loads,
            "profile_date": profile.provenance.get("date"),
            "real_wall_s": round(time.monotonic() - started, 1), "saturation_rps": saturation}
    if shape is not None:
        meta["probe_shape"] = dataclasses.asdict(shape)
    return report(runs, out, meta, cluster, profile, probes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="vllm-cpu-tiny-llama-tp1", help="name or path")
    p.add_argument("--cluster", default=str(CLUSTER))
    p.add_argument("--model-dir", default=str(TINY_MODEL_DIR))
    p.add_argument("--out", default="outputs/fidelity")
    p.add_argument("--rate-fracs", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.3, 0.55, 0.8, 0.95], help="fractions of the measured saturation")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="absolute rates (req/s) instead of --rate-fracs")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--saturation-requests", type=int, default=200)
    p.add_argument("--trace", default=SHAREGPT)
    p.add_argument("--trace-format", default="sharegpt")
    p.add_argument("--length-scale", type=float, default=0.5)
    p.add_argument("--max-context-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-real", default=None, metavar="DIR",
                   help="re-simulate the real runs saved in DIR (no engine is started)")
    p.add_argument("--no-probe", action="store_true",
                   help="no speed probe before each run (and no drift-adjusted errors)")
    p.add_argument("--probe-requests", type=int, default=4)
    p.add_argument("--probe-prompt-tokens", type=int, default=900)
    p.add_argument("--probe-output-tokens", type=int, default=200)
    p.add_argument("--max-load", type=float, default=0.7)
    p.add_argument("--max-wait-s", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    return asyncio.run(fidelity(parse_args(argv)))


if __name__ == "__main__":
    main()
