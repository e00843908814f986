"""Reads the ``summary.json`` of every run under a (multi)run directory into one DataFrame.

``python -m experiments.compare multirun/2026-11-22/10-00-00`` prints the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from experiments.report import format_table

#: A sweep's table of runs, written when the sweep ends (experiments.sweep_table).
RUNS_TABLE = "runs.parquet"


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per run: the sweep's table where it has one, else its summaries."""
    table = Path(root) / RUNS_TABLE
    if table.is_file():
        return pd.read_parquet(table)
    return summaries(root)


def summaries(root: str | Path) -> pd.DataFrame:
    """One row per run read from every ``summary.json`` under ``root`` (a single run's
    summary is a dict, a study's a list of dicts)."""
    rows: list[dict[str, object]] = []
    for path in sorted(Path(root).rglob("summary.json")):
        data = json.loads(path.read_text())
        for row in data if isinstance(data, list) else [data]:
            rows.append({**row, "run_dir": str(path.parent)})
    if not rows:
        raise ValueError(f"no summary.json under {root!s}; run experiments.run there first")
    return pd.DataFrame(rows)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m experiments.compare RUN_OR_MULTIRUN_DIR")
    print(format_table(load_runs(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
