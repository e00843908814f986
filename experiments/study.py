"""A study: several runs composed from the same base config, each at several loads, compared
in one table, curves over load and a few conclusions read from the results."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from joblib import Parallel, delayed
from omegaconf import DictConfig
from tqdm import tqdm

from experiments.build import build_run, run_setup
from experiments.report import (
    LABELS,
    format_table,
    load_conclusions,
    plot_goodput,
    plot_latency_cdfs,
    plot_load_curves,
    run_name,
    summary_row,
)

Composer = Callable[[list[str]], DictConfig]


@dataclass
class StudyResult:
    summary: pd.DataFrame
    requests: pd.DataFrame
    table: str
    files: dict[str, Path]
    conclusions: list[str]


def grid(study: DictConfig) -> list[dict[str, str]]:
    """The runs of a study: ``factorial`` crosses policies x routers x pd; ``one_at_a_time``
    varies each factor around the first value of the others. Each runs at every one of
    ``study.loads`` (rate multipliers, 1 = the workload as configured; key ``load``)."""
    factors = {
        "policy": list(study.policies),
        "router": list(study.routers),
        "pd": [str(p) for p in study.pd],
    }
    if study.design == "factorial":
        return [
            dict(zip(factors, combo, strict=True)) for combo in itertools.product(*factors.values())
        ]
    if study.design != "one_at_a_time":
        raise ValueError(f"study.design={study.design!r} is not one of: factorial, one_at_a_time")
    base = {k: v[0] for k, v in factors.items()}
    runs = [dict(base)]
    for key, values in factors.items():
        for value in values[1:]:
            runs.append({**base, key: value})
    for pd_value in factors["pd"][1:]:  # every policy with PD on too
        for policy in factors["policy"][1:]:
            runs.append({**base, "policy": policy, "pd": pd_value})
    return [{**run, "load": f"{load:g}"} for load in loads(study) for run in runs]


def loads(study: DictConfig) -> list[float]:
    values = [float(v) for v in study.get("loads") or [1.0]]
    if not all(v > 0 for v in values):
        raise ValueError(f"study.loads={values}: every load must be a rate multiplier > 0")
    return values


def base_overrides(overrides: list[str]) -> list[str]:
    """The overrides a study keeps for every run: all but those of the factors it varies."""
    return [o for o in overrides if o.split("=")[0].lstrip("~+") not in LABELS]


def overrides_for(run: dict[str, str]) -> list[str]:
    out = [f"policy={run['policy']}", f"router={run['router']}"]
    out.append("~pd" if run["pd"] == "off" else f"pd={run['pd']}")
    return out


def load_override(workload: DictConfig, load: float) -> list[str]:
    """The override that offers ``load`` times the workload's configured request rate: a trace
    replayed faster (its ``rate_rps`` times ``load``, else its ``time_scale`` over ``load``),
    or a synthetic stream's arrival rate times ``load``."""
    if load == 1.0:
        return []
    if workload.get("rate_rps") is not None:
        return [f"workload.rate_rps={workload.rate_rps * load!r}"]
    if "time_scale" in workload:
        return [f"workload.time_scale={workload.time_scale / load!r}"]
    arrival = workload.get("arrival")
    if arrival is not None and arrival.get("rate_rps") is not None:
        return [f"workload.arrival.rate_rps={arrival.rate_rps * load!r}"]
    raise ValueError(
        f"study.loads: cannot scale the rate of workload {workload.get('_target_')!r}; it needs "
        "rate_rps or time_scale (a trace) or arrival.rate_rps (a synthetic stream)"
    )


def _simulate(run: dict[str, str], cfg: DictConfig) -> tuple[dict[str, Any], pd.DataFrame]:
    labels = {k: run[k] for k in LABELS}
    result = run_setup(build_run(cfg, labels=labels))
    row = {**summary_row(labels, result), "load": float(run["load"])}
    return row, result.requests.assign(run=run_name(row), **run)


def run_study(
    runs: Sequence[dict[str, str]],
    compose: Composer,
    out_dir: Path,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run each configuration (``jobs`` at a time, -1: one per core), then write the table,
    plots and per-request parquet. A progress bar counts the runs unless ``log`` takes a line
    per run instead."""
    # compose here: Hydra's global state lives in this process, the runs may not
    base_workload = compose([]).workload
    configs = [
        compose(overrides_for(run) + load_override(base_workload, float(run["load"])))
        for run in runs
    ]
    outcomes = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(_simulate)(run, cfg) for run, cfg in zip(runs, configs, strict=True)
    )
    bar = tqdm(outcomes, total=len(runs), desc="study", unit="run", disable=log is not None)
    rows, frames = [], []
    for i, (row, frame) in enumerate(bar, 1):
        rows.append(row)
        frames.append(frame)
        if log is not None:
            log(
                f"[{i}/{len(runs)}] {run_name(row)}: goodput {row['goodput_rps']:.2f} req/s, "
                f"SLO {row['slo_compliance']:.1f}%, wall {row['wall_time_s']:.1f}s"
            )
    summary = pd.DataFrame(rows)
    requests = pd.concat(frames, ignore_index=True)
    for col in ("run", *LABELS, "load"):
        requests[col] = requests[col].astype("category")
    nominal = nominal_load(summary)
    at_nominal = summary[summary["load"] == nominal]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "requests": out_dir / "requests.parquet",
        "summary_csv": out_dir / "summary.csv",
        "summary_json": out_dir / "summary.json",
        "latency_cdf": plot_latency_cdfs(
            requests[requests["load"] == f"{nominal:g}"], out_dir / "latency_cdf.png"
        ),
        "goodput": plot_goodput(at_nominal, out_dir / "goodput.png"),
    }
    if summary["load"].nunique() > 1:
        files["load_curves"] = plot_load_curves(summary, out_dir / "load_curves.png")
    requests.to_parquet(files["requests"], index=False)
    summary.to_csv(files["summary_csv"], index=False)
    files["summary_json"].write_text(json.dumps(summary.to_dict("records"), indent=1, default=str))
    return StudyResult(
        summary, requests, format_table(at_nominal), files, load_conclusions(summary)
    )


def nominal_load(summary: pd.DataFrame) -> float:
    """The load the study's table shows: the one nearest the workload as configured (1x)."""
    values = summary["load"].unique()
    return float(min(values, key=lambda v: abs(float(v) - 1.0)))
