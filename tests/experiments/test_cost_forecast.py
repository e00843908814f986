"""Cost prediction (experiments/cost_forecast.py): a run's history resampled at a new rate,
the cheapest pool that meets the SLO on it, checked against the trace's actual future."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from cpsim.workload import default_trace_dir
from experiments import cost_forecast as cf

TRACE = default_trace_dir() / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"


def history(n: int = 500) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "num_prompt_tokens": rng.integers(100, 1500, n),
            "num_output_tokens": np.where(np.arange(n) % 50 == 0, 0, rng.integers(1, 300, n)),
            "slo_deadline_ms": np.where(np.arange(n) % 3 == 0, np.nan, 20_000.0),
            "priority": pd.Categorical(["NORMAL", "HIGH"] * (n // 2)),
            "user_id": pd.Categorical([f"u{i % 7}" for i in range(n)]),
        }
    )


def test_history_is_resampled_at_the_asked_rate() -> None:
    past = history()
    requests = list(cf.HistoryWorkload(past, rate_rps=5.0, duration_s=400.0).requests(1))
    assert len(requests) == pytest.approx(2000, rel=0.1)
    times = [t for t, _ in requests]
    assert times == sorted(times) and times[-1] < 400.0
    lengths = set(zip(past.num_prompt_tokens, past.num_output_tokens, strict=True))
    assert all((m.prompt_tokens, m.max_tokens) in lengths for _, m in requests)
    assert all(m.max_tokens > 0 for _, m in requests)  # records without output are left out
    assert {m.slo_deadline_ms for _, m in requests} == {None, 20_000.0}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (history().drop(columns="slo_deadline_ms"), "lack columns \\['slo_deadline_ms'\\]"),
        (history().assign(num_output_tokens=0), "no request that produced a token"),
    ],
)
def test_a_bad_history_is_named(records: pd.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cf.HistoryWorkload(records, rate_rps=1.0, duration_s=10.0)


def test_the_cheapest_pool_is_the_smallest_that_meets_the_slo() -> None:
    workload = cf.HistoryWorkload(history(), rate_rps=6.0, duration_s=300.0)
    count, tried = cf.cheapest_pool(lambda: workload.requests(0), 95.0, max_count=6)
    assert count is not None
    assert float(str(tried[count]["slo_compliance"])) >= 95.0
    if count > 1:  # one fewer misses (the search tried it, or one below it)
        below = [c for c in tried if c < count]
        assert below and all(float(str(tried[c]["slo_compliance"])) < 95.0 for c in below)
    nothing, _ = cf.cheapest_pool(lambda: workload.requests(0), 100.1, max_count=2)
    assert nothing is None


@pytest.mark.skipif(not TRACE.is_file(), reason=f"trace {TRACE} is absent (../shared/traces)")
def test_a_forecast_from_the_first_minutes_prices_the_next_ones() -> None:
    opts = argparse.Namespace(
        rates=[4.0, 10.0], slo_target=95.0, history_min=6.0, history_count=4, future_min=12.0,
        forecast_min=6.0, max_count=10,
    )  # fmt: skip
    table = cf.check(opts, [])
    for row in table.itertuples(index=False):
        forecast, truth = row[1], row[3]
        assert abs(forecast - truth) <= 1, row
        assert row[5] >= 90.0  # the forecast pool meets, or nearly meets, the SLO in truth
