"""A Hydra callback: when a sweep ends, every job's summary in one table,
``<sweep dir>/runs.parquet``, whichever launcher ran the jobs (``experiments.compare`` and
``load_runs`` read it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.compare import RUNS_TABLE, summaries


class SweepTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        if any(root.rglob("summary.json")):
            summaries(root).to_parquet(root / RUNS_TABLE, index=False)
