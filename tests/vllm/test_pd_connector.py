"""Prefill on one real server, decode on another, the KV cache moved by vLLM's ExampleConnector."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pandas as pd
import pytest

from backends.vllm.http import HTTPBackend
from backends.vllm.metrics_scrape import metric_sum, parse_prometheus_text
from cpsim.manager import ControlPlaneManager
from cpsim.types import ExecutionInstance, PDSeparationConfig, RequestMetadata, RequestStatus

pytestmark = pytest.mark.vllm

EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


def _metric(engine: Any, name: str) -> float:
    with urllib.request.urlopen(f"{engine.instance.endpoint}/metrics", timeout=5) as resp:
        value = metric_sum(parse_prometheus_text(resp.read().decode()), name)
    return 0.0 if value is None else value


def test_long_prompt_prefills_on_one_server_and_decodes_on_the_other(
    http_engines: list[Any],
) -> None:
    prefill, decode = http_engines[0], http_engines[1]
    hits_before = _metric(decode, EXTERNAL_HITS)

    async def main() -> Any:
        backend = HTTPBackend(scrape_interval_s=0.2, health_interval_s=0.5)
        pd_cfg = PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=256)
        cp = ControlPlaneManager(backend=backend, pd_config=pd_cfg, enable_monitoring=False)
        await cp.start()
        for engine, kind in ((prefill, "prefilling"), (decode, "decoding")):
            i = engine.instance
            cp.register_instance(
                ExecutionInstance(i.instance_id, host=i.host, port=i.port, instance_type=kind)
            )
        await cp.wait_for_instances()
        await cp.submit_request(RequestMetadata("pd-long", num_prompt_tokens=700, max_tokens=24))
        await cp.submit_request(RequestMetadata("pd-short", num_prompt_tokens=60, max_tokens=6))
        statuses = [await cp.wait_for_request(r, timeout_s=90) for r in ("pd-long", "pd-short")]
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        return statuses, records

    statuses, records = asyncio.run(main())
    assert statuses == [RequestStatus.COMPLETED] * 2
    long = records.loc["pd-long"]
    names = (prefill.instance.instance_id, decode.instance.instance_id)
    assert (long["prefill_instance_id"], long["decode_instance_id"]) == names
    assert long["instance_id"] == names[1]
    assert long["num_output_tokens"] == 24
    # the decode server loaded the prompt's full 128-token blocks (5 x 128 of 700) from
    # the files the prefill server wrote, instead of computing them
    assert _metric(decode, EXTERNAL_HITS) - hits_before == 640
    short = records.loc["pd-short"]
    assert short["instance_id"] == names[1]  # under the threshold: no hand-off
    assert pd.isnull(short["prefill_instance_id"])
