"""The seed documents' code runs: each block of ../shared/seed/*.md is in a file of
examples/seed/ (verbatim but for its import line and the completions the file names), and
every file runs on the default (simulated) backend and prints what the seed prints."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "seed"
SEED_DIR = Path(os.environ.get("CPSIM_SEED_DIR", ROOT.parent / "shared" / "seed"))
#: Needs a real vLLM engine: run by tests/vllm/test_seed_vllm_example.py.
VLLM_EXAMPLES = {"design_1_vllm_direct_integration.py"}

#: What each example must print (beyond exiting cleanly), from the seed's own print lines.
EXPECTED = {
    "design_2_pd_separation.py": [],
    "design_3_basic_usage.py": ["Request submitted: req-001", "Request status: RequestStatus.",
                                "Metrics: PerformanceMetrics(total_requests=1"],
    "design_4_advanced_config.py": [],
    "design_5_policy_switching.py": ["Running: False", "Policy: cost_optimized", "Pending: 0"],
    "design_6_monitoring.py": ["Total requests: 5", "Completed: 5", "Failed: 0",
                               "SLO compliance: ", "GPU utilization: ", "GPU memory used: "],
    "quickstart_1_to_7_five_minutes.py": ["✓ Control Plane started", "✓ Request submitted",
                                          "SLO Compliance: ", "✓ Control Plane stopped"],
    "quickstart_8_complete_example.py": ["Completed: ", "SLO Compliance: "],
    "quickstart_9_to_12_common_configs.py": [],
    "quickstart_13_policy_switching.py": ["adaptive"],
    "quickstart_14_request_status.py": ["RequestStatus."],
    "quickstart_15_instance_management.py": ["vllm-1: Load=0.00%", "Active: 0", "Healthy: "],
    "quickstart_16_to_18_tuning.py": [],
    "quickstart_19_reading_metrics.py": ["吞吐量: ", "尾延迟(p99): ", "SLO遵守率: "],
    "quickstart_20_to_22_troubleshooting.py": ["Available instances: 2", "vllm-1: healthy=True",
                                               "SLO violations: ", "vllm-3: load="],
    "quickstart_23_api_reference.py": [],
    "quickstart_24_request_fields.py": [],
}

#: Lines of the seed that cannot run as written, and what their example runs instead.
EDITS = {
    "outputs = await engine.generate(\n    prompt=prompt,\n    sampling_params=sampling_params,\n"
    "    request_id=request_id,\n)": "async for outputs in engine.generate(  # seed: outputs = "
    "await engine.generate(\n    prompt=prompt,\n    sampling_params=sampling_params,\n"
    "    request_id=request_id,\n):\n    pass",
    "new_instance = ExecutionInstance(...)": 'new_instance = ExecutionInstance(instance_id='
    '"vllm-3")  # seed: ExecutionInstance(...)',
}
#: A reference card, not a program: its example runs each of its lines, in a runnable order.
REORDERED = {"quickstart_23_api_reference.py"}


def seed_blocks() -> list[tuple[str, str]]:
    """(document, code) of each ``python`` block of the seed documents."""
    out = []
    for doc in ("control-plane-design.md", "quick-start.md"):
        lines = (SEED_DIR / doc).read_text(encoding="utf-8").split("\n")
        start = None
        for i, line in enumerate(lines):
            if start is None and line.startswith("```python"):
                start = i + 1
            elif start is not None and line.startswith("```"):
                out.append((doc, "\n".join(lines[start:i])))
                start = None
    return out


def as_cpsim(code: str) -> str:
    """The one change the seed allows: its import lines name cpsim."""
    for seed_module, ours in (
        ("vllm.control_plane.types", "cpsim.types"),
        ("vllm.control_plane", "cpsim"),
        ("control_plane", "cpsim"),
    ):
        code = code.replace(f"from {seed_module} import", f"from {ours} import")
    for seed_text, ours in EDITS.items():
        code = code.replace(seed_text, ours)
    return code


def code_lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def contains_run(lines: list[str], run: list[str]) -> bool:
    return any(lines[i : i + len(run)] == run for i in range(len(lines) - len(run) + 1))


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted({*EXPECTED, *VLLM_EXAMPLES})


@pytest.mark.skipif(not SEED_DIR.is_dir(), reason=f"seed documents not found at {SEED_DIR}")
def test_every_seed_block_is_in_an_example() -> None:
    files = {p.name: code_lines(p.read_text(encoding="utf-8")) for p in EXAMPLES.glob("*.py")}
    missing = []
    for doc, code in seed_blocks():
        block = code_lines(as_cpsim(code))
        whole = any(contains_run(lines, block) for lines in files.values())
        card = any(all(line in files[name] for line in block) for name in REORDERED)
        if not (whole or card):
            missing.append(f"{doc}: {block[:3]}")
    assert not missing, "seed blocks with no example:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every example, each in its own interpreter, a few at a time (they mostly wait on wall
    time); ``-X faulthandler`` so that a crash in native code still says where."""
    out: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-X", "faulthandler", str(EXAMPLES / name)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, result in zip(EXPECTED, pool.map(run, EXPECTED), strict=True):
            out[name] = result
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    run = runs[name]
    assert run.returncode == 0, (
        f"{name} exited {run.returncode}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    )
    for fragment in EXPECTED[name]:
        assert fragment in run.stdout, f"{name} did not print {fragment!r}:\n{run.stdout}"


def test_readme_api_example_is_the_seed_quick_start_and_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    example = (EXAMPLES / "quickstart_8_complete_example.py").read_text(encoding="utf-8")
    assert contains_run(code_lines(example), code_lines(code))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Completed: 0\nSLO Compliance: 100.00%" in run.stdout
