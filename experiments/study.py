"""A study: several runs composed from the same base config, compared in one table."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from experiments.build import build_run, run_setup
from experiments.report import (
    LABELS,
    format_table,
    plot_goodput,
    plot_latency_cdfs,
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


def grid(study: DictConfig) -> list[dict[str, str]]:
    """The runs of a study: ``factorial`` crosses policies x routers x pd; ``one_at_a_time``
    varies each factor around the first value of the others."""
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
    return runs


def base_overrides(overrides: list[str]) -> list[str]:
    """The overrides a study keeps for every run: all but those of the factors it varies."""
    return [o for o in overrides if o.split("=")[0].lstrip("~+") not in LABELS]


def overrides_for(run: dict[str, str]) -> list[str]:
    out = [f"policy={run['policy']}", f"router={run['router']}"]
    out.append("~pd" if run["pd"] == "off" else f"pd={run['pd']}")
    return out


def run_study(
    runs: Sequence[dict[str, str]],
    compose: Composer,
    out_dir: Path,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Run each configuration, then write the table, plots and per-request parquet."""
    rows, frames = [], []
    for i, run in enumerate(runs, 1):
        cfg = compose(overrides_for(run))
        result = run_setup(build_run(cfg, labels=run))
        row = summary_row(run, result)
        rows.append(row)
        frame = result.requests.assign(run=run_name(row), **run)
        frames.append(frame)
        log(
            f"[{i}/{len(runs)}] {run_name(row)}: goodput {row['goodput_rps']:.2f} req/s, "
            f"SLO {row['slo_compliance']:.1f}%, wall {result.wall_time_s:.1f}s"
        )
    summary = pd.DataFrame(rows)
    requests = pd.concat(frames, ignore_index=True)
    for col in ("run", *LABELS):
        requests[col] = requests[col].astype("category")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "requests": out_dir / "requests.parquet",
        "summary_csv": out_dir / "summary.csv",
        "summary_json": out_dir / "summary.json",
        "latency_cdf": plot_latency_cdfs(requests, out_dir / "latency_cdf.png"),
        "goodput": plot_goodput(summary, out_dir / "goodput.png"),
    }
    requests.to_parquet(files["requests"], index=False)
    summary.to_csv(files["summary_csv"], index=False)
    files["summary_json"].write_text(json.dumps(summary.to_dict("records"), indent=1, default=str))
    return StudyResult(summary, requests, format_table(summary), files)
