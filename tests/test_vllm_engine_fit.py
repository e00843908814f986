"""The calibration of vLLM 0.8 (V1): what the fit derives it from, how far its replay lands
from the public runs it held out (docs/latency-model.md), and how a cluster group names it."""

from __future__ import annotations

import json

import pytest

from cpsim.calibration import calibration_for_gpu, load_calibration
from cpsim.latency import StepBatch
from cpsim.pricing import latency_for
from experiments import fit_vllm_engine as fit
from experiments.build import build_instances

SHIPPED = fit.CALIBRATIONS / f"{fit.NAME}.json"


def test_the_shipped_calibration_is_the_base_with_its_two_fitted_terms() -> None:
    """Everything but layer_s and seq_s follows from the A100 calibration and the custom
    all-reduce's public timings, so a refit of either shows here."""
    shipped = json.loads(SHIPPED.read_text())
    derived = fit.calibration(shipped["layer_s"], shipped["seq_s"])
    for key in ("source", "fit"):
        shipped.pop(key)
    derived.pop("source")
    assert derived == shipped


def test_the_replay_lands_where_the_doc_says() -> None:
    """Fitted on the TP8 runs at 1 req/s and all at once: the two held-out rates' TPOT
    within 10 %, the fitted ones within 5 %, TTFT low by at most 20 % below saturation."""
    table = fit.replay(json.loads(SHIPPED.read_text())).set_index("log")
    for rate in ("4", "16"):
        row = table.loc[f"tp8-qps{rate}"]
        assert abs(row.tpot_p50_err_pct) < 10 and abs(row.tpot_p90_err_pct) < 10, rate
        assert -20 < row.ttft_p50_err_pct < 0, rate
    for rate in fit.FITTED_ON:
        row = table.loc[f"tp8-qps{rate}"]
        assert abs(row.tpot_p50_err_pct) < 5 and abs(row.tpot_p90_err_pct) < 5, rate


def test_the_ttft_gap_is_not_the_prefill_and_grows_with_the_streams_in_flight() -> None:
    """What docs/latency-model.md says of the TTFT gap: at 1 req/s (nothing cached) TTFT
    against prompt length is the same line, real and simulated; at 16 req/s (all cached) the
    real first tokens come later, more so in the run's last fifth than in its first."""
    gap = fit.ttft_gap(*fit.simulate(json.loads(SHIPPED.read_text()))).set_index("log")
    lone = gap.loc["tp8-qps1"]
    assert abs(lone.a_real_ms - lone.a_sim_ms) < 3.0
    assert lone.b_sim_ms_per_token == pytest.approx(lone.b_real_ms_per_token, rel=0.1)
    busy = gap.loc["tp8-qps16"]
    assert 0 < busy.gap_fifth1_ms < busy.gap_fifth5_ms


def test_a_lone_decode_step_costs_what_the_engine_took_beyond_its_weights() -> None:
    """The old (2023) calibration charges a TP8 decode step of Llama-3-70B on A100-40GB about
    twice the 21-25 ms a token the V1 engine took at 1 req/s."""
    step = StepBatch(num_decode_seqs=1, decode_context_tokens=600)
    group = {"name": "tp8", "count": 1, "tensor_parallel_size": 8, "cost_per_gpu_hour": 3.4}
    cluster = {"model": "llama-3-70b", "gpu_type": "A100-40GB", "gpu_memory_gb": 40.0}
    new_group = group | {"calibration": fit.NAME}
    (old,) = build_instances(cluster | {"groups": [group]}, pd_enabled=False)
    (new,) = build_instances(cluster | {"groups": [new_group]}, pd_enabled=False)
    old_model, _ = latency_for(old, "roofline")
    new_model, why = latency_for(new, "roofline")
    assert f"calibration {fit.NAME}" in why
    assert 0.021 < new_model.step_time_s(step) < 0.026
    assert old_model.step_time_s(step) > 1.7 * new_model.step_time_s(step)


def test_a_gpu_keeps_its_default_calibration_and_a_bad_name_is_refused() -> None:
    assert calibration_for_gpu("A100-40GB") is load_calibration("vllm-a100-80gb")
    assert load_calibration(fit.NAME).default is False
    group = {"name": "g", "count": 1, "tensor_parallel_size": 2, "cost_per_gpu_hour": 1.0,
             "calibration": "vllm-9-a100"}  # fmt: skip
    cluster = {"model": "llama-3-70b", "gpu_type": "A100-40GB", "gpu_memory_gb": 40.0}
    (inst,) = build_instances(cluster | {"groups": [group]}, pd_enabled=False)
    with pytest.raises(
        ValueError, match=r"unknown calibration 'vllm-9-a100'; allowed: .*vllm-0\.8"
    ):
        latency_for(inst, "roofline")
