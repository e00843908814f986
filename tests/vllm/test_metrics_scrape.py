"""The Prometheus text parser and the snapshot it gives (no engine needed)."""

from __future__ import annotations

import pytest

from backends.vllm.metrics_scrape import MetricsScraper, metric_sum, parse_prometheus_text

PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="/m/tiny llama"} 3.0
vllm:num_requests_running{engine="1",model_name="/m/tiny llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="a \\"quoted\\", name"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
process_open_fds 12 1700000000000
garbage line without value
"""


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vllm:num_requests_running", 5.0),  # summed over engines
        ("vllm:num_requests_waiting", 4.0),  # escaped quotes and commas in a label
        ("vllm:kv_cache_usage_perc", 0.25),
        ("process_open_fds", 12.0),  # no labels, a timestamp
        ("vllm:absent", None),
    ],
)
def test_parser_reads_each_metric(name: str, expected: float | None) -> None:
    assert metric_sum(parse_prometheus_text(PAGE), name) == expected


def test_labels_keep_escaped_characters() -> None:
    ((labels, value),) = parse_prometheus_text(PAGE)["vllm:num_requests_waiting"]
    assert labels == {"engine": "0", "model_name": 'a "quoted", name'} and value == 4.0


def test_snapshot_hit_rate_is_over_the_tokens_since_the_last_page() -> None:
    scraper = MetricsScraper("e0")
    first = scraper.snapshot(PAGE, 1.0)
    assert (first.num_running, first.num_waiting, first.kv_cache_usage_frac) == (5, 4, 0.25)
    assert first.prefix_cache_hit_rate == 0.25 and first.is_healthy is None
    later = PAGE.replace("1000.0", "1100.0").replace("250.0", "340.0")
    assert scraper.snapshot(later, 2.0).prefix_cache_hit_rate == pytest.approx(0.9)
    assert scraper.snapshot(later, 3.0).prefix_cache_hit_rate == pytest.approx(0.9)  # idle
