"""The fidelity report's speed probe (factors per run, drift-adjusted errors) and its
real-vs-real noise floor. No engine: a slowed-down simulation stands in for a real engine that
drifted since its profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from cpsim.profiles import load_profile
from experiments.fidelity import (
    CLUSTER,
    load_cluster,
    parse_args,
    resimulate,
    run_sim,
    simulate_probe,
    workload,
)
from experiments.fidelity_noise import main as noise_main
from experiments.fidelity_noise import real_vs_real
from experiments.fidelity_probe import Probe, ProbeShape, mean_latency_ms, run_factors

PROFILE = "vllm-cpu-tiny-llama-tp1"


def test_probe_requests_are_sent_together_with_prompts_of_their_own() -> None:
    shape = ProbeShape(3, 100, 20)
    first, second = shape.requests("a"), shape.requests("b")
    assert [t for t, _ in first] == [0.0, 0.0, 0.0]
    assert {m.max_tokens for _, m in first} == {20}
    ids = [m.request_id for _, m in first + second]
    assert len(set(ids)) == 6  # prompts are drawn from the ids: no shared prefixes


@pytest.mark.parametrize("field", ["num_requests", "prompt_tokens", "output_tokens"])
def test_a_bad_probe_shape_names_the_field(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}=0"):
        ProbeShape(**{field: 0})


def test_a_run_factor_is_the_geometric_mean_of_the_probes_around_it() -> None:
    probes = [Probe(b, "d", real, 100.0) for b, real in
              (("saturation", 110.0), ("poisson-0", 90.0), ("end", 121.0))]
    factors = run_factors(probes, ["saturation", "poisson-0"])
    assert factors == pytest.approx({"saturation": math.sqrt(1.1 * 0.9),
                                     "poisson-0": math.sqrt(0.9 * 1.21)})
    with pytest.raises(ValueError, match="expected one before each of"):
        run_factors(probes[:2], ["saturation", "poisson-0"])


def test_a_probe_that_did_not_complete_is_an_error() -> None:
    records = pd.DataFrame({"status": ["COMPLETED", "FAILED"], "latency_ms": [1.0, None]})
    with pytest.raises(RuntimeError, match="FAILED"):
        mean_latency_ms(records)


def _saved_report(path: Path, factor: float, rates: tuple[float, ...] = (1.0, 3.0)) -> Path:
    """A report folder whose 'real' runs come from the profile scaled by ``factor``."""
    cluster, slow = load_cluster(CLUSTER), load_profile(PROFILE).scaled(factor)
    args = parse_args(["--num-requests", "12", "--length-scale", "0.2"])
    path.mkdir()
    rows = []
    for i, rate in enumerate(rates):
        real = run_sim(cluster, slow, workload(rate, 12, args, f"r{i}-"))
        real.to_parquet(path / f"real-poisson-{i}.parquet", index=False)
        rows += [{"run": f"poisson-{i}", "rate_rps": rate, "load_frac": rate / 4, "metric": m,
                  "real": 1.0, "sim": 1.0, "rel_error": 0.0} for m in ("ttft_p50_ms",)]
    pd.DataFrame(rows).to_csv(path / "fidelity.csv", index=False)
    return path


def test_a_uniform_drift_is_taken_out_exactly(tmp_path: Path) -> None:
    """'Real' runs from an engine 25 % slower than its profile: the raw errors show it, the
    probes measure 1.25, and the errors with the profile scaled by it are zero."""
    cluster, profile = load_cluster(CLUSTER), load_profile(PROFILE)
    slow = profile.scaled(1.25)
    saved = _saved_report(tmp_path / "real", 1.25)
    shape = ProbeShape(2, 300, 40)
    real_probe_ms = simulate_probe(cluster, slow, shape)
    probes = [{"before": b, "date": "d", "real_ms": real_probe_ms, "sim_ms": 0.0}
              for b in ("poisson-0", "poisson-1", "end")]
    (saved / "fidelity.json").write_text(json.dumps(
        {"probes": probes, "probe_shape": {"num_requests": 2, "prompt_tokens": 300,
                                           "output_tokens": 40}}))

    out = tmp_path / "out"
    out.mkdir()
    resim = parse_args(["--reuse-real", str(saved), "--profile", PROFILE, "--out", str(out)])
    table = resimulate(resim, cluster, profile, out)
    raw = table[table["metric"] == "latency_p50_ms"]["rel_error"]
    assert (raw < -0.1).all()  # the unscaled profile is well below the slower engine
    adjusted = pd.read_csv(out / "fidelity_adjusted.csv")
    assert adjusted["speed_factor"].to_numpy() == pytest.approx(1.25)
    errors = adjusted[adjusted["metric"] != "completed"]["rel_error"]
    assert errors.abs().max() < 1e-9
    meta = json.loads((out / "fidelity.json").read_text())
    assert meta["speed_factors"] == pytest.approx({"poisson-0": 1.25, "poisson-1": 1.25})
    assert "scaled by the run's factor" in (out / "fidelity.md").read_text()


def test_real_vs_real_compares_two_reports_of_the_same_runs(tmp_path: Path) -> None:
    first = _saved_report(tmp_path / "a", 1.0)
    second = _saved_report(tmp_path / "b", 1.2)
    table = real_vs_real(first, second)
    tpot = table[table["metric"] == "tpot_p50_ms"]
    assert list(tpot["run"]) == ["poisson-0", "poisson-1"]
    assert (tpot["rel_error"] > 0.15).all()  # the second engine is 20 % slower per step
    noise_main([str(first), str(second), "--out", str(tmp_path / "noise")])
    assert "The second real run relative to the first" in (
        tmp_path / "noise" / "real_vs_real.md").read_text()
    other = _saved_report(tmp_path / "c", 1.0, rates=(1.0, 2.0))
    with pytest.raises(ValueError, match="the rates must match"):
        real_vs_real(first, other)
