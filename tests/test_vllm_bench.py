"""experiments.vllm_bench: the result file of vLLM's own serving benchmark read as a
per-request log, its send times recorded or regenerated as the client drew them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from experiments.replay import DEFAULT_COLUMNS, main, read_log
from experiments.vllm_bench import PER_REQUEST, client_arrivals

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "data" / "published" / "llm-k8s-llama33-70b-a100"
DISTSERVE_VLLM = ROOT / "data" / "published" / "distserve-opt-13b-sharegpt" / "vllm-100-1.csv"


def result(**fields: Any) -> dict[str, Any]:
    """Three requests as ``vllm bench serve --save-detailed`` writes them (the third failed)."""
    base: dict[str, Any] = {
        "request_rate": 2.0,
        "burstiness": 1.0,
        "max_concurrency": None,
        "input_lens": [100, 300, 50],
        "output_lens": [4, 1, 0],
        "ttfts": [0.05, 0.08, 0.0],
        "itls": [[0.02, 0.02, 0.03], [], []],
        "errors": ["", "", "Bad Gateway"],
    }
    return base | fields


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_a_result_with_send_times_reads_in_send_order_without_its_failures(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, result(start_times=[100.5, 100.0, 101.0], latencies=[0.2, 0.08, 0]))
    log = read_log(path, DEFAULT_COLUMNS)
    assert log["arrival_s"].tolist() == [0.0, 0.5]
    assert log["prompt"].tolist() == [300, 100] and log["output"].tolist() == [1, 4]
    assert log["ttft_ms"].tolist() == pytest.approx([80.0, 50.0])
    # vLLM's TPOT: (latency - TTFT) / (output - 1); none for a one-token answer
    assert np.isnan(log["tpot_ms"][0]) and log["tpot_ms"][1] == pytest.approx(50.0)
    assert log.attrs["failed"] == 1


def test_without_latencies_tpot_is_the_sum_of_the_token_gaps(tmp_path: Path) -> None:
    log = read_log(write(tmp_path, result(request_rate="inf")), DEFAULT_COLUMNS)
    assert log["arrival_s"].tolist() == [0.0, 0.0]  # all at once
    assert log["tpot_ms"].dropna().tolist() == pytest.approx([70.0 / 3])


def test_send_times_that_are_not_in_the_file_are_asked_for_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no start_times.*--vllm-schedule.*'sequential'"):
        read_log(write(tmp_path, result()), DEFAULT_COLUMNS)
    with pytest.raises(ValueError, match="a ramp-up"):
        read_log(
            write(tmp_path, result(ramp_up_strategy="linear")), DEFAULT_COLUMNS, "s", "normalized"
        )
    with pytest.raises(ValueError, match="a concurrency limit"):
        read_log(write(tmp_path, result(max_concurrency=8)), DEFAULT_COLUMNS, "s", "sequential")
    with pytest.raises(ValueError, match="schedule 'poisson'"):
        client_arrivals(3, 1.0, 1.0, 0, "poisson")
    empty = {key: [] for key in PER_REQUEST}
    with pytest.raises(ValueError, match="no requests in it"):
        read_log(write(tmp_path, result(**empty)), DEFAULT_COLUMNS, "s", "normalized")
    with pytest.raises(ValueError, match="lists of different lengths"):
        read_log(write(tmp_path, result(ttfts=[0.1])), DEFAULT_COLUMNS, "s", "sequential")


@pytest.mark.parametrize("rate", [1, 4, 16])
def test_the_sequential_schedule_is_the_one_a_server_log_confirmed(rate: int) -> None:
    """llm-k8s's send times were regenerated for vLLM 0.8.3's client and checked against the
    seconds its server logged each request in (data/published/llm-k8s-llama33-70b-a100)."""
    logged = pd.read_csv(K8S / f"tp8-qps{rate}.csv")["issue_time_s"].to_numpy()
    regenerated = client_arrivals(len(logged), float(rate), 1.0, 0, "sequential")
    assert regenerated == pytest.approx(logged, abs=1e-6)


def test_the_normalized_schedule_ends_at_n_over_the_rate() -> None:
    """From July 2025 the client scales its summed draws so the last request goes at n / rate
    after the client started (the first after one scaled draw)."""
    n, rate = 50, 2.0
    draws = np.random.RandomState(7).gamma(shape=1.0, scale=1.0 / rate, size=n)
    sent = client_arrivals(n, rate, 1.0, 7, "normalized")
    scale = (n / rate) / draws.sum()
    assert sent[0] == 0.0 and sent[-1] + draws[0] * scale == pytest.approx(n / rate)
    assert np.diff(sent) == pytest.approx(draws[1:] * scale)
    assert np.diff(client_arrivals(4, 2.0, float("inf"), 0, "normalized")) == pytest.approx(
        [0.5] * 3
    )


def test_a_result_replays_as_the_same_requests_in_a_table_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One of DistServe's vLLM logs written as a vLLM benchmark result (plus a failed request)
    replays to the same table as the log itself."""
    csv = pd.read_csv(DISTSERVE_VLLM)
    ttft_s = csv["ttft_ms"] / 1e3
    latency_s = ttft_s + csv["tpot_ms"].fillna(0.0) / 1e3 * (csv["output_len"] - 1).clip(lower=0)
    data = {
        "request_rate": 1.0,
        "input_lens": [*csv["prompt_len"], 10],
        "output_lens": [*csv["output_len"], 0],
        "ttfts": [*ttft_s, 0.0],
        "itls": [[]] * (len(csv) + 1),
        "latencies": [*latency_s, 0.0],
        "start_times": [*(csv["issue_time_s"] + 5000.0), 5000.0],
        "errors": [""] * len(csv) + ["timeout"],
    }
    path = tmp_path / DISTSERVE_VLLM.with_suffix(".json").name
    path.write_text(json.dumps(data))
    overrides = ["--", "cluster=distserve_opt13b", "~pd"]
    from_result = main([str(path), *overrides])
    assert f"{path}: left out 1 failed request(s), replaying {len(csv)}" in capsys.readouterr().out
    from_csv = main([str(DISTSERVE_VLLM), *overrides])
    numbers = from_csv.columns.drop("log")
    pd.testing.assert_frame_equal(from_result[numbers], from_csv[numbers], rtol=1e-9)


def test_results_appended_into_one_file_are_refused_by_count(tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(result(request_rate="inf")) for _ in range(2)))
    with pytest.raises(ValueError, match=r"2 vLLM benchmark results, one a line"):
        read_log(path, DEFAULT_COLUMNS)
