"""The experiment layer end to end: build_run, run_study, the Hydra entry point and load_runs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from experiments.build import build_run, run_setup
from experiments.compare import load_runs
from experiments.report import TABLE_COLUMNS
from experiments.schema import register
from experiments.study import grid, load_override, run_study
from experiments.sweep_table import SweepTable, planned_jobs

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
NUM_REQUESTS = 60
#: A fast setup: the tiny workload, cut short, on one on-demand and one spot replica (PD: one
#: prefill and one decode replica).
SMALL = [
    "workload=tiny",
    f"workload.num_requests={NUM_REQUESTS}",
    "cluster.groups.0.count=1",
    "cluster.groups.1.count=1",
    "cluster.pd_groups=[{name: prefill, count: 1, instance_type: prefilling, "
    "cost_per_gpu_hour: 4.1, max_concurrent_requests: 32}, {name: decode, count: 1, "
    "instance_type: decoding, cost_per_gpu_hour: 1.6, max_concurrent_requests: 32}]",
]
SUMMARY_COLUMNS = {
    "policy",
    "router",
    "pd",
    "requests",
    "completed",
    "failed",
    "goodput_rps",
    "slo_compliance",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "e2e_p99_ms",
    "throughput_tok_s",
    "cost_per_1m_tokens_usd",
    "sim_time_s",
    "wall_time_s",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

register()


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def small_config(*extra: str) -> DictConfig:
    return compose(config_name="config", overrides=[*SMALL, *extra])


def test_build_run_runs_one_configuration(hydra_conf: None) -> None:
    cfg = small_config(
        "policy=slo_aware", "router=round_robin", "pd=threshold", "pd.threshold_tokens=128"
    )
    setup = build_run(cfg)
    assert (setup.labels["policy"], setup.labels["router"]) == ("SLOAware", "RoundRobin")
    assert sorted(setup.simulation.procs) == ["decode-0", "prefill-0"]
    result = run_setup(setup)
    df = result.requests
    assert len(df) == NUM_REQUESTS and (df["status"] == "COMPLETED").all()
    split = df[df["num_prompt_tokens"] >= 128]
    whole = df[df["num_prompt_tokens"] < 128]
    assert len(split) > 0 and len(whole) > 0
    assert (split["prefill_instance_id"] == "prefill-0").all()
    assert (split["decode_instance_id"] == "decode-0").all()
    assert whole["prefill_instance_id"].isna().all() and (whole["instance_id"] == "decode-0").all()
    assert result.metrics.completed_requests == NUM_REQUESTS
    assert set(result.instances["instance_id"].astype(str)) == set(setup.simulation.procs)


@pytest.mark.parametrize(
    ("option", "label"), [("threshold", "Threshold"), ("adaptive", "Adaptive")]
)
def test_default_pd_label_drops_the_role_suffix(hydra_conf: None, option: str, label: str) -> None:
    assert build_run(small_config(f"pd={option}")).labels["pd"] == label


def test_build_run_is_deterministic_per_seed(hydra_conf: None) -> None:
    def records(seed: int) -> pd.DataFrame:
        return run_setup(build_run(small_config("router=power_of_two", f"seed={seed}"))).requests

    pd.testing.assert_frame_equal(records(1), records(1))
    assert not records(1)["ttft_ms"].equals(records(2)["ttft_ms"])


def test_run_study_writes_one_row_per_run_and_its_files(hydra_conf: None, tmp_path: Path) -> None:
    cfg = small_config(
        "study.policies=[fifo,slo_aware]", "study.routers=[load_balanced]", "study.loads=[1]"
    )
    runs = grid(cfg.study)
    assert len(runs) == 4  # one_at_a_time: 2 policies, PD off and on for each
    logged: list[str] = []
    result = run_study(runs, lambda extra: small_config(*extra), tmp_path, log=logged.append)

    summary = result.summary
    assert len(summary) == len(runs) == len(logged)
    assert set(summary.columns) >= SUMMARY_COLUMNS
    assert set(TABLE_COLUMNS) <= set(summary.columns)
    assert [
        {**dict(zip(("policy", "router", "pd"), r[:3], strict=True)), "load": f"{r[3]:g}"}
        for r in summary[["policy", "router", "pd", "load"]].itertuples(index=False)
    ] == runs
    assert (summary["requests"] == NUM_REQUESTS).all()
    assert (summary["completed"] + summary["failed"] <= NUM_REQUESTS).all()
    assert (summary["goodput_rps"] > 0).all()
    for name in ("fifo", "slo_aware", "goodput req/s", "TTFT p99 ms"):
        assert name in result.table

    files = result.files
    assert set(files) == {"requests", "summary_csv", "summary_json", "latency_cdf", "goodput"}
    assert all(path.parent == tmp_path and path.is_file() for path in files.values())
    requests = pd.read_parquet(files["requests"])
    assert len(requests) == NUM_REQUESTS * len(runs)
    assert requests["run"].nunique() == len(runs)
    assert len(json.loads(files["summary_json"].read_text())) == len(runs)
    assert len(pd.read_csv(files["summary_csv"])) == len(runs)
    for key in ("latency_cdf", "goodput"):
        assert files[key].read_bytes()[:8] == PNG_MAGIC


def test_a_study_over_load_scales_the_rate_and_draws_curves_and_conclusions(
    hydra_conf: None, tmp_path: Path
) -> None:
    cfg = small_config(
        "study.policies=[fifo,priority]", "study.routers=[load_balanced]", "study.loads=[0.5,2]"
    )
    runs = grid(cfg.study)
    assert [r["load"] for r in runs] == ["0.5"] * 4 + ["2"] * 4
    result = run_study(runs, lambda extra: small_config(*extra), tmp_path, jobs=2)

    summary = result.summary
    offered = summary.groupby("load")["offered_rps"].mean()
    assert offered[2.0] / offered[0.5] == pytest.approx(4.0, rel=0.25)  # tiny: Poisson at 20/s
    assert offered[0.5] == pytest.approx(10.0, rel=0.25)
    assert (summary.groupby("load")["requests"].unique().map(list) == [[NUM_REQUESTS]] * 2).all()
    assert result.files["load_curves"].read_bytes()[:8] == PNG_MAGIC
    assert set(result.requests["load"].astype(str)) == {"0.5", "2"}
    assert "2x" not in result.table  # the table shows the load nearest 1x; the curves both
    text = "\n".join(result.conclusions)
    assert "Highest goodput" in text and "PD separation (threshold)" in text
    best = summary.loc[summary["goodput_rps"].idxmax()]
    assert f"{best['goodput_rps']:.2f} req/s meet their SLO" in text


def test_load_override_scales_each_kind_of_workload(hydra_conf: None) -> None:
    assert load_override(small_config().workload, 2.0) == ["workload.arrival.rate_rps=40.0"]
    trace = compose(config_name="config", overrides=["workload=azure_conv_study"]).workload
    assert load_override(trace, 2.0) == [f"workload.time_scale={trace.time_scale / 2.0!r}"]
    assert load_override(trace, 1.0) == []
    mooncake = compose(
        config_name="config", overrides=["workload=mooncake_conv", "workload.rate_rps=3.0"]
    ).workload
    assert load_override(mooncake, 0.5) == ["workload.rate_rps=1.5"]
    with pytest.raises(ValueError, match=r"study\.loads=\[0\.0\]"):
        grid(small_config("study.loads=[0]").study)


def _run_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_main_study_prints_the_table_and_writes_the_plots(tmp_path: Path) -> None:
    out = _run_main(
        "workload=tiny",
        "study.policies=[fifo,slo_aware]",
        "study.routers=[load_balanced]",
        "study.loads=[1,2]",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if "goodput req/s" in line)
    assert header.split()[:2] == ["policy", "pd"]  # the router does not vary: not shown
    rows = [
        line.split()[0]
        for line in out.stdout.splitlines()
        if line.split()[1:2] in (["off"], ["threshold"])
    ]
    assert sorted(rows) == ["fifo", "fifo", "slo_aware", "slo_aware"]
    for name in ("latency_cdf.png", "goodput.png", "load_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 8  # 4 runs at 2 loads
    assert "goodput (req/s) by load" in out.stdout
    assert "- Highest goodput:" in out.stdout and "- PD separation (threshold)" in out.stdout


def test_multirun_writes_one_summary_per_job_and_load_runs_reads_them(tmp_path: Path) -> None:
    out = _run_main("-m", "policy=fifo,priority", "workload=tiny", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted(tmp_path.rglob("summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"]
    for job in summaries:
        assert (job.parent / "requests.parquet").is_file()
        assert (job.parent / "instances.parquet").is_file()
    assert "Joblib.Parallel" in out.stdout + out.stderr  # the jobs ran in parallel
    assert "sweep: 100%" in out.stderr and "2/2" in out.stderr  # the sweep's progress bar
    assert (tmp_path / "runs.parquet").is_file()  # one table of the sweep, at its end
    runs = load_runs(tmp_path)
    assert len(runs) == 2
    assert sorted(runs["policy"]) == ["fifo", "priority"]
    assert (runs["router"] == "load_balanced").all() and (runs["pd"] == "off").all()
    assert (runs["requests"] == 200).all()
    assert runs["run_dir"].map(lambda d: Path(d).parent == tmp_path).all()


def _sweep_config(root: Path, sweeper: dict[str, object], task: list[str]) -> DictConfig:
    return OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(root)}, "sweeper": sweeper, "overrides": {"task": task}}}
    )


def test_planned_jobs_counts_what_the_sweeper_will_run(tmp_path: Path) -> None:
    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}
    task = ["policy=fifo,slo_aware", "router=a,b,c", "workload=tiny"]
    assert planned_jobs(_sweep_config(tmp_path, basic, task)) == 6
    with_params = {**basic, "params": {"seed": "0,1"}}
    assert planned_jobs(_sweep_config(tmp_path, with_params, task)) == 12
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}
    assert planned_jobs(_sweep_config(tmp_path, {**optuna, "n_trials": 7}, task)) == 7
    assert planned_jobs(_sweep_config(tmp_path, {"_target_": "x.Other"}, task)) is None


def test_a_sweep_table_that_lacks_jobs_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"policy": "fifo"}))
    config = _sweep_config(
        tmp_path,
        {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
        ["policy=fifo,slo_aware"],
    )
    callback = SweepTable(poll_s=0.01)
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    assert len(load_runs(tmp_path)) == 1
    assert "has 1 of the 2 jobs planned" in caplog.text


def test_load_runs_without_summaries_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no summary\.json"):
        load_runs(tmp_path)


def test_the_black_hole_table_runs_and_ejection_pays_off() -> None:
    from experiments.black_hole import run

    on = run("round_robin", True, 300, 2.0)
    off = run("round_robin", False, 300, 2.0)
    assert on["completed_frac"] >= 0.95 and on["ejections"] >= 1
    assert off["completed_frac"] < on["completed_frac"] and off["ejections"] == 0
