"""The autoscaling study: autoscalers against fixed pools on a workload whose load swings,
compared on SLO attainment against the GPU-hours they pay for.

    python -m experiments.run study=autoscaling

Each run is one configuration of ``study.scalers`` (conf/autoscaling/) or a fixed pool of
each of ``study.fixed_counts`` instances. It prints a table (SLO attainment, GPU-hours, cost,
p99 TTFT, the most instances used) and the cheapest run that meets ``study.slo_target``,
and writes ``autoscaling.png`` (the offered load and each run's instances over time; SLO
attainment against GPU-hours), ``scaling.parquet`` (each autoscaled run's series) and
``summary.csv`` to the output directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from omegaconf import DictConfig
from tqdm import tqdm

from experiments.build import build_run, run_setup
from experiments.report import summary_row

Composer = Callable[[list[str]], DictConfig]

COLUMNS = {
    "slo_compliance": "SLO %",
    "gpu_hours": "GPU-hours",
    "total_cost_usd": "cost $",
    "ttft_p99_ms": "TTFT p99 ms",
    "e2e_p99_ms": "E2E p99 ms",
    "max_instances": "max instances",
    "failed": "failed",
}


@dataclass
class AutoscalingResult:
    summary: pd.DataFrame
    scaling: pd.DataFrame
    table: str
    conclusion: str
    files: dict[str, Path]


def study_runs(study: DictConfig) -> list[tuple[str, list[str]]]:
    """(name, overrides) of each run: a fixed pool per ``fixed_counts``, an autoscaler per
    ``scalers``."""
    runs = [(f"fixed {n}", [f"cluster.groups.0.count={n}"]) for n in study.get("fixed_counts", [])]
    runs += [(str(s), [f"autoscaling={s}"]) for s in study.get("scalers", [])]
    if not runs:
        raise ValueError("study.scalers and study.fixed_counts are both empty; give at least one")
    return runs


def _simulate(name: str, cfg: DictConfig) -> tuple[dict[str, object], pd.DataFrame, pd.DataFrame]:
    result = run_setup(build_run(cfg, labels={"run": name}))
    row = summary_row({"run": name}, result)
    scaling = result.scaling.assign(run=name)
    if len(scaling):
        row["max_instances"] = int((scaling["ready"] + scaling["starting"]).max())
    else:  # a fixed pool: every group at its count
        row["max_instances"] = len(result.instances["instance_id"].unique())
    arrivals = result.requests["arrival_time_s"].to_numpy(dtype=float)
    minute = np.floor(arrivals / 60.0) * 60.0
    load = pd.Series(1.0 / 60.0, index=minute).groupby(level=0).sum()
    return row, scaling, load.rename_axis("time_s").reset_index(name="arrivals_per_s")


def run_autoscaling_study(
    study: DictConfig, compose: Composer, out_dir: Path, jobs: int = 1
) -> AutoscalingResult:
    runs = study_runs(study)
    configs = [compose(overrides) for _, overrides in runs]
    outcomes = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(_simulate)(name, cfg) for (name, _), cfg in zip(runs, configs, strict=True)
    )
    rows, series, load = [], [], pd.DataFrame()
    for row, scaling, offered in tqdm(outcomes, total=len(runs), desc="study", unit="run"):
        rows.append(row)
        series.append(scaling)
        load = offered
    summary = pd.DataFrame(rows)
    scaling = pd.concat([s for s in series if len(s)] or [pd.DataFrame()], ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "summary_csv": out_dir / "summary.csv",
        "scaling": out_dir / "scaling.parquet",
        "plot": plot_autoscaling(summary, scaling, load, out_dir / "autoscaling.png"),
    }
    summary.to_csv(files["summary_csv"], index=False)
    scaling.to_parquet(files["scaling"], index=False)
    shown = summary[["run", *COLUMNS]].rename(columns=COLUMNS)
    table = shown.to_string(index=False, float_format=lambda v: f"{v:,.2f}")
    return AutoscalingResult(
        summary, scaling, table, conclusion(summary, float(study.slo_target)), files
    )


def conclusion(summary: pd.DataFrame, slo_target: float) -> str:
    """The cheapest run (fewest GPU-hours) whose SLO attainment meets ``slo_target`` %, and
    what it saves against the cheapest fixed pool that meets it."""
    meets = summary[summary["slo_compliance"] >= slo_target].sort_values("gpu_hours")
    if meets.empty:
        best = summary.loc[summary["slo_compliance"].idxmax()]
        return (
            f"No run meets {slo_target:g} % SLO attainment; the best is {best['run']} "
            f"({best['slo_compliance']:.1f} %, {best['gpu_hours']:.2f} GPU-hours)."
        )
    best = meets.iloc[0]
    line = (
        f"Cheapest run meeting {slo_target:g} % SLO attainment: {best['run']} "
        f"({best['slo_compliance']:.1f} %, {best['gpu_hours']:.2f} GPU-hours)"
    )
    fixed = meets[meets["run"].str.startswith("fixed ")]
    if not fixed.empty and not str(best["run"]).startswith("fixed "):
        base = fixed.iloc[0]
        saved = 1.0 - best["gpu_hours"] / base["gpu_hours"]
        line += (
            f", {100 * saved:.0f} % fewer GPU-hours than the smallest fixed pool that does "
            f"({base['run']})"
        )
    return line + "."


def plot_autoscaling(
    summary: pd.DataFrame, scaling: pd.DataFrame, load: pd.DataFrame, path: Path
) -> Path:
    """Left: the offered load (req/s per minute) and each run's instances (serving and
    starting) over time; right: SLO attainment against GPU-hours, one point per run."""
    fig, (ax_time, ax_cost) = plt.subplots(1, 2, figsize=(15, 5.5), width_ratios=(2, 1))
    colours = dict(zip(summary["run"], plt.get_cmap("tab10").colors, strict=False))
    load_ax = ax_time.twinx()
    load_ax.fill_between(load["time_s"] / 60, load["arrivals_per_s"], color="0.85", step="post")
    load_ax.set_ylabel("offered load (req/s, per minute)", color="0.4")
    ax_time.set_zorder(load_ax.get_zorder() + 1)
    ax_time.patch.set_visible(False)
    end_s = float(load["time_s"].max() + 60) if len(load) else 0.0
    for _, row in summary.iterrows():
        name = row["run"]
        mine = scaling[scaling["run"] == name] if len(scaling) else scaling
        if len(mine):
            x, y = mine["time_s"] / 60, mine["ready"] + mine["starting"]
            ax_time.step(x, y, where="post", lw=1.6, color=colours[name], label=name)
        else:
            ax_time.hlines(row["max_instances"], 0, end_s / 60, lw=1.6, ls="--",
                           color=colours[name], label=name)  # fmt: skip
    ax_time.set_xlabel("time (min)")
    ax_time.set_ylabel("instances (serving + starting)")
    ax_time.grid(True, alpha=0.3)
    ax_time.legend(loc="upper left", fontsize=8)
    for _, row in summary.iterrows():
        ax_cost.scatter(row["gpu_hours"], row["slo_compliance"], color=colours[row["run"]], s=40)
        ax_cost.annotate(str(row["run"]), (row["gpu_hours"], row["slo_compliance"]),
                         textcoords="offset points", xytext=(5, 3), fontsize=8)  # fmt: skip
    ax_cost.set_xlabel("GPU-hours paid (cold starts included)")
    ax_cost.set_ylabel("SLO attainment (%)")
    ax_cost.set_ylim(0, 105)
    ax_cost.grid(True, alpha=0.3)
    fig.suptitle("Autoscalers against fixed pools: instances over time, and SLO against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_result(result: AutoscalingResult, out: Callable[[str], None] = print) -> None:
    out(result.table)
    out("")
    out(f"- {result.conclusion}")
    out("")
    for name, path in result.files.items():
        out(f"{name:>12}: {path}")
