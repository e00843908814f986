"""Programmatic entry points for notebooks and tests: compose ``conf/`` and run, no CLI needed.

from experiments.api import simulate, study
result = simulate("policy=slo_aware", "router=prefix_cache_aware", "workload=tiny")
result.requests.head(); result.metrics
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from backends.sim.cluster import RunResult
from experiments.build import build_run, run_setup
from experiments.schema import register
from experiments.study import StudyResult, base_overrides, grid, run_study

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """A command line's own arguments and the Hydra overrides after ``--``."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut], argv[cut + 1 :]


def compose_config(*overrides: str) -> DictConfig:
    """The composed run config for Hydra-style overrides (``"policy=fifo"``)."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def simulate(*overrides: str) -> RunResult:
    """One simulation of the composed config (the study settings are ignored)."""
    return run_setup(build_run(compose_config(*overrides)))


def study(out_dir: str | Path, *overrides: str) -> StudyResult:
    """The study of the composed config (``conf/study``), files written under ``out_dir``."""
    cfg = compose_config(*overrides)
    base = base_overrides(list(overrides))
    compose = lambda extra: compose_config(*base, *extra)  # noqa: E731
    jobs = cfg.study.get("jobs") or -1
    return run_study(grid(cfg.study), compose, Path(out_dir), jobs=jobs)
