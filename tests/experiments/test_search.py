"""Configuration search: the Optuna sweeper over deployments, each trial scored by its price
when it meets the objective's SLO (experiments.run.objective_value), the answer named at the
end and every trial in the sweep's table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from experiments.compare import load_runs
from experiments.run import objective_value
from tests.test_experiments import _run_main

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

#: Six deployments (1-3 replicas at TP 1 or 2), all tried by the grid sampler.
TINY_SEARCH = """\
# @package _global_
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: grid
  - override /cluster: search
workload: {rate_rps: 8.0, time_scale: 1.0, duration_s: 40.0}
objective: {slo: {ttft_p99_ms: 2000.0, tpot_p99_ms: 100.0}}
hydra:
  sweeper:
    direction: minimize
    n_trials: 6
    n_jobs: 2
    params:
      cluster.replicas: choice(1, 2, 3)
      cluster.tensor_parallel_size: choice(1, 2)
"""


def test_a_grid_search_names_the_cheapest_deployment_that_meets_the_slo(tmp_path: Path) -> None:
    (tmp_path / "conf" / "search").mkdir(parents=True)
    (tmp_path / "conf" / "search" / "tiny.yaml").write_text(TINY_SEARCH)
    sweep = tmp_path / "sweep"
    out = _run_main(
        "-m",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "search=tiny",
        f"hydra.sweep.dir={sweep}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = load_runs(sweep)
    assert len(runs) == 6
    assert sorted(runs["usd_per_hour"].round(2)) == [4.1, 8.2, 8.2, 12.3, 16.4, 24.6]
    met = runs[runs["meets_slo"]]
    assert not met.empty and not runs["meets_slo"].all()  # the SLO separates them
    assert ((met["ttft_p99_ms"] <= 2000) & (met["tpot_p99_ms"] <= 100)).all()
    missed = runs[~runs["meets_slo"]]
    assert (missed["objective"] > 1000).all()  # every miss ranks behind every deployment
    assert (met["objective"] == met["usd_per_hour"]).all()
    cheapest = met["usd_per_hour"].min()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(cheapest)
    logs = out.stderr + out.stdout
    assert f"cheapest deployment meeting the SLO ({len(met)} of 6 tried met it): " in logs
    assert f"${cheapest:.2f}/hour" in logs


def test_the_shipped_search_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = _run_main(
        "-m",
        "search=cheapest_under_slo",
        "hydra.sweeper.n_trials=2",
        "workload.duration_s=20",
        f"hydra.sweep.dir={sweep}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(load_runs(sweep)) == 2
    assert (sweep / "optimization_results.yaml").is_file()


def test_the_objective_is_the_price_when_the_slo_is_met_and_a_ranked_penalty_when_not() -> None:
    objective = OmegaConf.create(
        {"slo": {"ttft_p99_ms": 2000.0, "tpot_p99_ms": 100.0}, "penalty_usd_per_hour": 1000.0}
    )
    row = {"ttft_p99_ms": 1500.0, "tpot_p99_ms": 99.0, "usd_per_hour": 16.4}
    assert objective_value(row, objective) == (True, 16.4)
    near = objective_value({**row, "ttft_p99_ms": 2200.0}, objective)
    far = objective_value({**row, "tpot_p99_ms": 300.0}, objective)
    assert near == (False, pytest.approx(1100.0)) and far == (False, pytest.approx(3000.0))
    assert objective_value({**row, "ttft_p99_ms": math.nan}, objective)[1] > far[1]
    with pytest.raises(ValueError, match=r"objective\.slo\.ttft_p90_ms: not a summary column"):
        objective_value(row, OmegaConf.create({"slo": {"ttft_p90_ms": 1.0}}))
