"""Autoscaling live (backends/live_autoscale.py) over the manager's simulated backend: a burst
makes the pool grow (each new instance registered once its cold start is over) and a lull
drains it back, without losing a request."""

from __future__ import annotations

import asyncio

import pytest

from backends.live_autoscale import LiveAutoscaler, SimInstanceLauncher
from backends.sim.live import SimBackend
from cpsim.manager import ControlPlaneManager
from cpsim.types import ExecutionInstance, RequestMetadata
from policies.autoscaling.utilization import TargetUtilizationScaler

TEMPLATE = ExecutionInstance(
    "template", model_name="opt-13b", gpu_type="A100-80GB", max_concurrent_requests=4
)


async def burst_then_lull(
    cp: ControlPlaneManager, scaler: LiveAutoscaler, model: str | None = None
) -> int:
    """30 requests at once, served to the end; then the lull, until the pool is back to one
    instance (at most 10 s). Returns how many instances the burst grew the pool to."""
    for i in range(30):
        await cp.submit_request(
            RequestMetadata(f"r{i}", model_name=model, num_prompt_tokens=200, max_tokens=200)
        )
    await cp.drain(timeout_s=120)
    grown = len(cp.get_instances())
    for _ in range(200):
        if len(scaler.serving) == 1 and not scaler.draining:
            break
        await asyncio.sleep(0.05)
    return grown


def test_a_burst_grows_the_pool_and_a_lull_drains_it() -> None:
    async def main() -> tuple:
        cp = ControlPlaneManager(enable_monitoring=False, backend=SimBackend(time_scale=10.0))
        launcher = SimInstanceLauncher(TEMPLATE, cold_start_s=0.3)
        cp.register_instance(await launcher.start(0))
        await cp.start()
        await cp.wait_for_instances()
        scaler = LiveAutoscaler(
            cp,
            TargetUtilizationScaler(target_utilization=0.5, scale_in_window_s=5.0, interval_s=1.0),
            launcher,
            min_instances=1,
            max_instances=3,
        )
        await scaler.start(adopt=["scaled-0"])
        grown = await burst_then_lull(cp, scaler, model="opt-13b")
        await scaler.stop()
        records = cp.get_request_records()
        instances = [i.instance_id for i in cp.get_instances()]
        await cp.stop()
        return grown, records, instances, scaler.events

    grown, records, instances, events = asyncio.run(asyncio.wait_for(main(), 180.0))
    assert grown == 3
    kinds = [kind for _, kind, _ in events]
    assert kinds.count("ready") == 2 and kinds.count("stopped") == 2
    assert len(records) == 30 and (records["status"] == "COMPLETED").all()
    served = set(records["instance_id"].astype(str))
    assert {"scaled-1", "scaled-2"} & served  # the new instances served
    assert len(instances) == 1
    # a new instance serves only after its cold start
    for (t_start, kind, what), _ in zip(events, events, strict=True):
        if kind == "start":
            ready = next(t for t, k, w in events if k == "ready" and w == f"scaled-{what}")
            assert ready - t_start >= 0.3 * 10.0 * 0.9  # 0.3 wall s = 3 simulated s


def test_bad_bounds_name_the_value() -> None:
    async def main() -> None:
        cp = ControlPlaneManager(enable_monitoring=False)
        with pytest.raises(ValueError, match="max_instances=1 is below min_instances=2"):
            LiveAutoscaler(cp, TargetUtilizationScaler(), SimInstanceLauncher(TEMPLATE), 2, 1)

    asyncio.run(main())


def test_cpsim_serve_autoscales_each_pool_within_its_groups_bounds() -> None:
    pytest.importorskip("fastapi")
    from backends.live_autoscale import PoolAutoscaling
    from experiments.serve import build_gateway
    from tests.test_configs import compose_serve

    cfg = compose_serve([
        "autoscaling=target_utilization", "autoscaling.interval_s=1.0",
        "autoscaling.scale_in_window_s=5.0", "autoscaling.target_utilization=0.5",
        "cluster=autoscale_opt13b", "cluster.cold_start_s=3.0", "backend.time_scale=10.0",
        "cluster.groups.0.count=1", "cluster.groups.0.max_count=3",
        "cluster.groups.0.max_concurrent_requests=4",
    ])  # fmt: skip
    gateway, _ = build_gateway(cfg, {})
    (scaling,) = gateway.services
    assert isinstance(scaling, PoolAutoscaling)
    (scaler,) = scaling.scalers
    assert (scaler.pool, scaler.min_instances, scaler.max_instances) == ("engine", 1, 3)
    assert scaler.launcher.cold_start_s == pytest.approx(0.3)  # simulated seconds / time_scale

    async def main() -> tuple:
        cp = gateway.manager
        await gateway.start()
        grown = await burst_then_lull(cp, scaler)
        records = cp.get_request_records()
        await gateway.stop()
        return grown, records, list(scaler.serving)

    grown, records, serving = asyncio.run(asyncio.wait_for(main(), 180.0))
    assert grown == 3 and serving == ["engine-0"]
    assert len(records) == 30 and (records["status"] == "COMPLETED").all()
    assert {"engine-1", "engine-2"} & set(records["instance_id"].astype(str))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["autoscaling=queue_slo", "restart=backoff"], "restart= and autoscaling= together"),
        (["autoscaling=queue_slo", "backend=vllm_http", "cluster=vllm_endpoints"],
         "autoscaling= needs engines cpsim starts"),
    ],
)
def test_cpsim_serve_refuses_autoscaling_it_cannot_carry_out(
    overrides: list[str], message: str
) -> None:
    pytest.importorskip("fastapi")
    from experiments.serve import build_gateway
    from tests.test_configs import compose_serve

    with pytest.raises(ValueError, match=message):
        build_gateway(compose_serve(overrides), {})


def test_an_autoscaled_vllm_pool_starts_within_its_groups_bounds() -> None:
    from experiments.serve import vllm_pool_bounds

    cluster = {"vllm": {"num_instances": 1}, "groups": [{"name": "engine", "max_count": 3}]}
    assert vllm_pool_bounds(cluster) == (1, 3)
    cluster["groups"][0]["min_count"] = 2
    with pytest.raises(ValueError, match=r"num_instances=1 must lie within the group's "
                                         r"min_count=2 and max_count=3"):
        vllm_pool_bounds(cluster)
