"""The main job: ``python -m experiments.run`` runs the default study; ``-m`` sweeps single runs.

A plain run compares the scheduling policies and routers of ``conf/study`` (PD on and off)
and prints one table; in multirun mode (``-m policy=fifo,slo_aware ...``) each job is one
simulation that writes its own records and returns its goodput for sweepers.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.autoscaling import print_result, run_autoscaling_study
from experiments.build import build_run, run_setup
from experiments.report import LABELS, goodput_by_load, summary_row
from experiments.schema import register
from experiments.study import base_overrides, grid, nominal_load, run_study

log = logging.getLogger("cpsim.experiments")
register()


def single_run(cfg: DictConfig, out_dir: Path) -> float:
    """One simulation: records, per-instance series and a summary under ``out_dir``; returns
    its goodput, or its ``objective`` (for sweepers)."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    choices = hydra_cfg.runtime.choices if hydra_cfg else {}
    labels = {k: str(choices.get(k) or "off") for k in LABELS}
    result = run_setup(build_run(cfg, labels=labels))
    row = summary_row(labels, result)
    if hydra_cfg is not None:
        row["overrides"] = " ".join(hydra_cfg.overrides.task)
    value = float(row["goodput_rps"])
    if cfg.get("objective") is not None:
        row["meets_slo"], value = objective_value(row, cfg.objective)
        row["objective"] = value
    out_dir.mkdir(parents=True, exist_ok=True)
    result.requests.to_parquet(out_dir / "requests.parquet", index=False)
    result.instances.to_parquet(out_dir / "instances.parquet", index=False)
    if len(result.scaling):  # an autoscaled run: each pool's instances and load per tick
        result.scaling.to_parquet(out_dir / "scaling.parquet", index=False)
    (out_dir / "summary.json").write_text(json.dumps(row, indent=1, default=str))
    print(json.dumps(row, indent=1, default=str))
    return value


def objective_value(row: dict[str, object], objective: DictConfig) -> tuple[bool, float]:
    """Whether the run met every bound of ``objective.slo`` (summary column -> most allowed,
    e.g. ``ttft_p99_ms: 2000``), and its score, to minimise: the deployment's price per hour
    when it does; else ``penalty_usd_per_hour`` x (1 + the worst relative excess), which ranks
    every miss behind every deployment cheaper than the penalty, and nearer misses first."""
    excess = 0.0
    for column, bound in objective.slo.items():
        if column not in row:
            raise ValueError(f"objective.slo.{column}: not a summary column; one of {sorted(row)}")
        value = float(str(row[column]))
        if math.isnan(value):  # nothing completed: no percentile to meet the bound
            excess = math.inf
        elif value > bound:
            excess = max(excess, value / bound - 1.0)
    if excess == 0.0:
        return True, float(str(row["usd_per_hour"]))
    return False, float(objective.penalty_usd_per_hour) * (1.0 + min(excess, 1e6))


def study_run(cfg: DictConfig, out_dir: Path) -> float:
    task_overrides = base_overrides(list(HydraConfig.get().overrides.task))

    def compose(extra: list[str]) -> DictConfig:
        return hydra.compose(config_name="config", overrides=task_overrides + extra)

    if cfg.study.get("kind") == "autoscaling":
        scaled = run_autoscaling_study(cfg.study, compose, out_dir, cfg.study.get("jobs") or -1)
        print()
        print_result(scaled)
        return float(scaled.summary["slo_compliance"].max())

    result = run_study(grid(cfg.study), compose, out_dir, jobs=cfg.study.get("jobs") or -1)
    print()
    print(f"At {nominal_load(result.summary):g}x load:")
    print(result.table)
    print()
    print(goodput_by_load(result.summary))
    print()
    for line in result.conclusions:
        print(f"- {line}")
    print()
    for name, path in result.files.items():
        print(f"{name:>12}: {path}")
    best = result.summary["goodput_rps"].max()
    return float(best)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN or cfg.get("study") is None:
        return single_run(cfg, out_dir)
    return study_run(cfg, out_dir)


if __name__ == "__main__":
    main()
