"""Whole MoE steps against public vLLM runs of Mixtral (docs/latency-model.md, "Whole MoE
steps"): where the analytical model lands, as the doc says."""

from __future__ import annotations

import pandas as pd
import pytest

from cpsim.latency import StepBatch
from cpsim.roofline import RooflineLatencyModel
from experiments import check_moe_steps as check


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return check.table()


def test_a_batch_is_its_prefill_steps_then_output_len_minus_one_decode_steps() -> None:
    model = RooflineLatencyModel("mixtral-8x7b", "A100-80GB", 2)
    decode = model.step_time_s(StepBatch(num_decode_seqs=1, decode_context_tokens=101))
    prefill = model.step_time_s(
        StepBatch(num_prefill_tokens=100, sum_sq_prefill_tokens=100**2, num_prefill_seqs=1)
    )
    assert check.batch_latency_s(model, 1, 100, 2) == pytest.approx(prefill + decode)
    # 64 prompts of 1,000 tokens exceed the 32,768-token budget: two prefill steps of 32
    two = model.step_time_s(
        StepBatch(num_prefill_tokens=32_000, sum_sq_prefill_tokens=32 * 10**6, num_prefill_seqs=32)
    )
    assert check.batch_latency_s(model, 64, 1000, 1) == pytest.approx(2 * two)


def test_every_published_run_is_priced(table: pd.DataFrame) -> None:
    assert len(table) == 40 and table["sim_s"].gt(0).all()
    assert table.loc[table["gpu"] == "A100-80GB", "sim_vllm08_s"].notna().all()


def test_the_vllm_08_terms_price_mixtral_8x22b_within_11_percent(table: pd.DataFrame) -> None:
    shipped = table[table["variant"].isin(check.SHIPPED_VARIANT)]
    big = shipped[shipped["model"] == "mixtral-8x22b"]
    assert big["err_vllm08_pct"].abs().max() < 11
    assert big["err_pct"].min() > 30  # the 2023 engine's terms: far too slow


def test_tp8_gains_more_over_tp4_in_the_model_than_in_the_runs(table: pd.DataFrame) -> None:
    ratios = check.tp_scaling(table)
    assert ratios["real"].between(0.6, 0.7).all()
    assert (ratios["sim_vllm08"] < ratios["real"]).all()
    assert (ratios["sim_vllm08"] > 0.8 * ratios["real"]).all()


def test_the_large_prefills_are_where_mixtral_8x7b_misses(table: pd.DataFrame) -> None:
    tp2 = table[table["variant"] == check.SHIPPED_VARIANT[1]].set_index("batch")
    assert tp2.loc[[2, 4, 8, 16], "err_vllm08_pct"].abs().max() < 11
    assert tp2.loc[[32, 64], "err_vllm08_pct"].min() > 25
