"""The calibration of vLLM 0.8 (V1): what the fit derives it from, how far its replay lands
from the public runs it held out (docs/latency-model.md), and how a cluster group names it."""

from __future__ import annotations

import json

import pytest

from cpsim.calibration import Calibration, calibration_for_gpu, load_calibration
from cpsim.latency import StepBatch
from cpsim.pricing import latency_for
from experiments import fit_vllm_engine as fit
from experiments.build import build_instances

SHIPPED = fit.CALIBRATIONS / f"{fit.NAME}.json"


def test_the_shipped_calibration_is_the_base_with_its_three_fitted_terms() -> None:
    """Everything but layer_s, seq_s and frontend_stream_s follows from the A100 calibration
    and the custom all-reduce's public timings, so a refit of any shows here."""
    shipped = json.loads(SHIPPED.read_text())
    derived = fit.calibration(shipped["layer_s"], shipped["seq_s"], shipped["frontend_stream_s"])
    for key in ("source", "fit"):
        shipped.pop(key)
    derived.pop("source")
    assert derived == shipped


def test_the_replay_lands_where_the_doc_says() -> None:
    """Engine terms fitted on TPOT at 1 req/s and all at once, the frontend on TTFT at 16:
    4 req/s, held out, within 10 % at p50 and p90 (TTFT and TPOT); TPOT within 5 % at the
    rates it was fitted on and 10 % at 16."""
    table = fit.replay(json.loads(SHIPPED.read_text())).set_index("log")
    held_out = table.loc["tp8-qps4"]
    for metric in fit.METRICS:
        assert abs(held_out[f"{metric}_err_pct"]) < 10, metric
    busy = table.loc["tp8-qps16"]
    assert abs(busy.tpot_p50_err_pct) < 10 and abs(busy.tpot_p90_err_pct) < 10
    for rate in fit.FITTED_ON:
        row = table.loc[f"tp8-qps{rate}"]
        assert abs(row.tpot_p50_err_pct) < 5 and abs(row.tpot_p90_err_pct) < 5, rate


def test_the_ttft_gap_is_not_the_prefill_and_the_frontend_closes_its_growth() -> None:
    """What docs/latency-model.md says of the TTFT gap: at 1 req/s (nothing cached) TTFT
    against prompt length is the same line, real and simulated; at 16 req/s (all cached)
    the engine alone gives the first tokens too early, more so as streams build up over
    the run, and the frontend's queue of every stream's tokens takes most of that up."""
    shipped = json.loads(SHIPPED.read_text())
    gap = fit.ttft_gap(*fit.simulate(shipped)).set_index("log")
    lone = gap.loc["tp8-qps1"]
    assert abs(lone.a_real_ms - lone.a_sim_ms) < 3.0
    assert lone.b_sim_ms_per_token == pytest.approx(lone.b_real_ms_per_token, rel=0.1)
    engine_only = fit.calibration(shipped["layer_s"], shipped["seq_s"])
    busy = fit.ttft_gap(*fit.simulate(engine_only)).set_index("log").loc["tp8-qps16"]
    assert 0 < busy.gap_fifth1_ms < busy.gap_fifth5_ms
    fifths = [f"gap_fifth{k}_ms" for k in range(1, 6)]
    with_frontend = gap.loc["tp8-qps16"]
    assert max(abs(with_frontend[f]) for f in fifths) < 0.5 * busy.gap_fifth5_ms


def test_the_frontend_fitted_at_4_req_s_would_not_keep_up_with_200_streams() -> None:
    """Why the frontend is fitted at 16 req/s (docs/latency-model.md): the cost per stream
    that 4 req/s asks for (about twice) leaves the frontend behind the engine when all 200
    requests stream at once, where the real TPOT shows no such lag."""
    shipped = json.loads(SHIPPED.read_text())
    doubled = fit.calibration(shipped["layer_s"], shipped["seq_s"],
                              2 * shipped["frontend_stream_s"])  # fmt: skip
    table = fit.replay(doubled).set_index("log")
    assert table.loc["tp8-qpsinf"].tpot_p50_err_pct > 20


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


@pytest.mark.parametrize("key", ["layer_s", "frontend_stream_s", "frontend_request_s"])
def test_a_negative_cost_in_a_calibration_is_refused_by_name(key: str) -> None:
    data = json.loads(SHIPPED.read_text()) | {key: -1e-6}
    with pytest.raises(ValueError, match=key):
        Calibration.from_dict(data)
