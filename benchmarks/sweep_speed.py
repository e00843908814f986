"""Sweep speed: the wall time of one Hydra multirun, jobs in parallel (the joblib launcher,
the default for ``-m``: one job per core) against one after another (``hydra/launcher=basic``).

Both sweeps run the same ``--jobs`` single simulations (``seed=0..N-1`` with the given
overrides) in fresh processes, one sweep after the other; the table is each sweep's wall
time and the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sweep_s(launcher: str, jobs: int, overrides: list[str]) -> float:
    """Wall seconds of ``experiments.run -m`` over ``jobs`` seeds with ``launcher``."""
    out = tempfile.mkdtemp(prefix=f"sweep-{launcher}-")
    command = [
        sys.executable, "-m", "experiments.run", "-m", f"seed=range({jobs})",
        f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}", *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    if not (Path(out) / "runs.parquet").is_file():
        raise RuntimeError(f"the sweep in {out} wrote no runs.parquet")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("overrides", nargs="*", default=["workload=azure_conv_study"])
    args = parser.parse_args()
    times = {launcher: sweep_s(launcher, args.jobs, args.overrides)
             for launcher in ("basic", "joblib")}
    print(f"jobs: {args.jobs}, overrides: {' '.join(args.overrides)}")
    print(f"serial (basic):   {times['basic']:8.1f} s")
    print(f"parallel (joblib): {times['joblib']:7.1f} s")
    print(f"speed-up:          {times['basic'] / times['joblib']:7.2f}x")


if __name__ == "__main__":
    main()
