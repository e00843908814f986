"""The notebooks run top to bottom against the current code, as CI runs them: every
notebooks/*.ipynb is executed by papermill in a Jupyter kernel of this interpreter, with small
parameters so that each takes seconds, in a scratch folder (nothing is written into the repo).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

papermill = pytest.importorskip("papermill", reason="needs the notebooks extra (papermill)")
nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra (papermill)")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "python3"  # ipykernel's, in this virtualenv: this interpreter (see the test below)

# Per notebook: values for its `parameters` cell that keep a run to a few seconds (the cell's
# own values are the full run). Every notebook that declares `out_dir` also gets one under
# the test's folder. A notebook not named here runs with its own values.
SMALL: dict[str, dict[str, Any]] = {
    "prefix_cache_routing.ipynb": {"max_requests": 300, "rates_rps": [2.0, 5.0]},
    "fidelity.ipynb": {},  # reads a saved report: already fast
    "compare_policies.ipynb": {"loads": [0.5, 1.5], "duration_s": 60.0},
}


def execute(path: Path, tmp_path: Path, parameters: dict[str, Any]) -> Any:
    """Run ``path`` with ``parameters`` in ``tmp_path`` (its working directory, so relative
    outputs land there); papermill raises on the first cell that fails."""
    declared = papermill.inspect_notebook(str(path))
    params = dict(parameters)
    if "out_dir" in declared:
        params.setdefault("out_dir", str(tmp_path / "out"))
    unknown = sorted(set(params) - set(declared))
    assert not unknown, f"{path.name} has no parameters {unknown} (its `parameters` cell)"
    return papermill.execute_notebook(
        str(path),
        str(tmp_path / f"executed-{path.name}"),
        parameters=params,
        kernel_name=KERNEL,
        cwd=str(tmp_path),
        progress_bar=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    execute(path, tmp_path, SMALL.get(path.name, {}))
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith("executed-")]
    assert written, f"{path.name} wrote nothing (figures, tables) under its output folder"


def test_notebooks_are_stored_without_outputs() -> None:
    """Outputs stay out of the repository: they are what a run makes, and they bloat diffs."""
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: clear its outputs before committing"
                )


@pytest.mark.slow
def test_the_kernel_is_this_interpreter(tmp_path: Path) -> None:
    """The notebooks import this checkout's packages, so their kernel must be this virtualenv's
    Python, not another Jupyter's."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys\nsys.executable")])
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "which.ipynb")
    done = papermill.execute_notebook(
        str(tmp_path / "which.ipynb"),
        str(tmp_path / "out.ipynb"),
        kernel_name=KERNEL,
        cwd=str(tmp_path),
        progress_bar=False,
    )
    shown = done.cells[0].outputs[0]["data"]["text/plain"]
    assert shown == repr(sys.executable)


# A report folder as `python -m experiments.fidelity` saves it, per-request records included,
# whose "real" engine is the simulator with the profile 15 % slower (no vLLM needed).
FIDELITY_REPORT = """
import sys
from pathlib import Path

from cpsim.profiles import load_profile
from experiments.fidelity import CLUSTER, Run, load_cluster, parse_args, report, run_sim, workload

folder = Path(sys.argv[1])
folder.mkdir()
cluster, profile = load_cluster(CLUSTER), load_profile("vllm-cpu-tiny-llama-tp1")
args = parse_args(["--num-requests", "16", "--length-scale", "0.2"])
runs = []
for i, rate in enumerate((1.0, 3.0)):
    requests = workload(rate, 16, args, f"r{i}-")
    real = run_sim(cluster, profile.scaled(1.15), requests)
    sim = run_sim(cluster, profile, requests)
    runs.append(Run(f"poisson-{i}", rate, rate / 4, real, sim, requests))
report(runs, folder, {"command": "tests/test_notebooks.py"}, cluster, profile)
"""


@pytest.mark.slow
def test_fidelity_notebook_overlays_per_request_records(tmp_path: Path) -> None:
    """The committed report has only its table; a report with records gets the CDF overlay
    (and the notebook checks that the records give the table's percentiles)."""
    path = ROOT / "notebooks" / "fidelity.ipynb"
    if not path.is_file():
        pytest.skip("no notebooks/fidelity.ipynb")
    saved = tmp_path / "report"
    # in a fresh interpreter: under a bare `pytest`, tests/ is on sys.path and tests/policies
    # would shadow the policies package that experiments.fidelity imports
    made = subprocess.run(
        [sys.executable, "-c", FIDELITY_REPORT, str(saved)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    execute(path, tmp_path, {"report_dir": str(saved), "simulated": "sim"})
    assert (tmp_path / "out" / "fidelity_cdfs.png").is_file()
    assert "from per-request records" in (tmp_path / "out" / "conclusion.md").read_text()
