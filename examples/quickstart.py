"""Quick start: the seed API on simulated vLLM replicas (no GPU, no engine needed).

python examples/quickstart.py
"""

from __future__ import annotations

import asyncio

from backends.sim.live import SimBackend
from cpsim import (
    ControlPlaneManager,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    RequestMetadata,
    RequestPriority,
    RequestStatus,
)


async def main() -> None:
    control_plane = ControlPlaneManager(
        scheduling_policy="adaptive",
        routing_strategy="load_balanced",
        enable_monitoring=True,
        enable_pd_separation=True,
        pd_config=PDSeparationConfig(
            enabled=True, routing_policy="threshold", prefilling_threshold_input_tokens=800
        ),
        backend=SimBackend(time_scale=5.0),  # five simulated seconds per wall second
    )
    # Two general instances, one prefill and one decode instance of Llama-3-8B on A100s.
    instances = [
        ExecutionInstance("general-0", model_name="llama-3-8b", cost_per_gpu_hour=2.0),
        ExecutionInstance("general-1", model_name="llama-3-8b", cost_per_gpu_hour=1.2),
        ExecutionInstance(
            "prefill-0", model_name="llama-3-8b", instance_type=ExecutionInstanceType.PREFILLING
        ),
        ExecutionInstance(
            "decode-0", model_name="llama-3-8b", instance_type=ExecutionInstanceType.DECODING
        ),
    ]
    for instance in instances:
        control_plane.register_instance(instance)  # plain, as in the seed: no loop needed
    await control_plane.start()  # the backend is told of the instances now

    priorities = [
        RequestPriority.CRITICAL,
        RequestPriority.HIGH,
        RequestPriority.NORMAL,
        RequestPriority.LOW,
    ]
    request_ids = []
    for i in range(40):
        metadata = RequestMetadata(
            request_id=f"req-{i}",
            user_id=f"user-{i % 5}",
            priority=priorities[i % 4],
            slo_deadline_ms=8000,
            max_tokens=64,
            model_name="llama-3-8b",
            num_prompt_tokens=200 if i % 3 else 1500,  # every third prompt is long: PD
        )
        request_ids.append(await control_plane.submit_request(metadata))

    status = control_plane.get_status()
    print(f"status: {status}")

    cancelled = await control_plane.cancel_request("req-39")
    print(f"cancelled req-39: {cancelled}")

    for rid in request_ids:
        await control_plane.wait_for_request(rid, timeout_s=60)

    metrics = control_plane.get_metrics()
    print(
        f"completed={metrics.completed_requests} failed={metrics.failed_requests} "
        f"cancelled={metrics.cancelled_requests}"
    )
    print(
        f"latency avg={metrics.avg_latency_ms:.0f} ms p95={metrics.p95_latency_ms:.0f} ms "
        f"p99={metrics.p99_latency_ms:.0f} ms; TTFT p50={metrics.p50_ttft_ms:.0f} ms"
    )
    print(
        f"throughput={metrics.throughput_tokens_per_s:.0f} tok/s, "
        f"SLO compliance={metrics.slo_compliance_rate:.1%}, "
        f"cost per token=${metrics.cost_per_token:.2e}"
    )
    for instance in control_plane.get_instances():
        print(instance.instance_id, control_plane.get_instance_metrics(instance.instance_id))

    control_plane.router.routing_strategy = "prefix_cache_aware"
    control_plane.update_policy("slo_aware")
    print(f"after switches: {control_plane.get_status()}")

    records = control_plane.get_request_records()
    print(
        records[
            [
                "request_id",
                "priority",
                "status",
                "ttft_ms",
                "latency_ms",
                "instance_id",
                "prefill_instance_id",
                "decode_instance_id",
            ]
        ]
        .head(8)
        .to_string(index=False)
    )
    assert await control_plane.get_request_status("req-0") is RequestStatus.COMPLETED
    await control_plane.stop()


if __name__ == "__main__":
    asyncio.run(main())
