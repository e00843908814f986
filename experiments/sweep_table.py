"""A Hydra callback for every sweep: a progress bar while it runs (jobs done of the jobs
planned, with an ETA), and when it ends every job's summary in one table,
``<sweep dir>/runs.parquet``, whichever launcher ran the jobs (``experiments.compare`` and
``load_runs`` read it), with a warning when the table lacks jobs."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm import tqdm

from experiments.compare import RUNS_TABLE, summaries

log = logging.getLogger("cpsim.experiments")


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will run: the Optuna sweeper's ``n_trials``, or the basic
    sweeper's cross product of its sweep overrides; None for another sweeper."""
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(
        params + list(config.hydra.overrides.task)
    )
    (jobs,) = BasicSweeper.split_arguments(overrides, None)  # one batch: all of them
    return len(jobs)


def cheapest_meeting_slo(runs: pd.DataFrame) -> str:
    """A search's answer: the cheapest run that met the objective's SLO, and what it set."""
    met = runs[runs["meets_slo"].astype(bool)]
    if met.empty:
        return f"none of the {len(runs)} deployments tried met the SLO"
    best = met.sort_values(["usd_per_hour", "goodput_rps"], ascending=[True, False]).iloc[0]
    return (
        f"cheapest deployment meeting the SLO ({len(met)} of {len(runs)} tried met it): "
        f"${best['usd_per_hour']:.2f}/hour, TTFT p99 {best['ttft_p99_ms']:.0f} ms, TPOT p99 "
        f"{best['tpot_p99_ms']:.1f} ms, goodput {best['goodput_rps']:.2f} req/s; "
        f"{best['overrides']}"
    )


class SweepTable(Callback):
    def __init__(self, poll_s: float = 1.0) -> None:
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # Launchers pickle the callbacks with each job; the watcher stays in the sweep's process.
    def __getstate__(self) -> dict[str, Any]:
        return {"poll_s": self.poll_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        root, total = Path(config.hydra.sweep.dir), planned_jobs(config)
        started = time.time()
        self._stop.clear()
        self._watcher = threading.Thread(
            target=self._watch, args=(root, total, started), daemon=True
        )
        self._watcher.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        root, total = Path(config.hydra.sweep.dir), planned_jobs(config)
        found = sorted(root.rglob("summary.json"))
        if found:
            runs = summaries(root)
            runs.to_parquet(root / RUNS_TABLE, index=False)
            if "meets_slo" in runs:
                log.info("%s", cheapest_meeting_slo(runs))
        if total is not None and len(found) < total:
            log.warning(
                "%s has %d of the %d jobs planned: the others failed, or wrote their summary "
                "where they ran (another machine's disk: see docs/sweeps.md)",
                root / RUNS_TABLE, len(found), total,
            )  # fmt: skip

    def _watch(self, root: Path, total: int | None, started: float) -> None:
        """Counts the jobs done (a summary written since the sweep started) until the end."""

        def done() -> int:
            return sum(1 for p in root.rglob("summary.json") if p.stat().st_mtime >= started)

        with tqdm(total=total, desc="sweep", unit="job") as bar:
            while not self._stop.wait(self.poll_s):
                bar.update(done() - bar.n)
            bar.update(done() - bar.n)
