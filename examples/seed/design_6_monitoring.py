"""control-plane-design.md, "监控指标": every metric the seed prints."""

# Completion: the block reads the metrics of a control plane `cp` that has served requests;
# here one instance serves five on the default (simulated) backend first.
import asyncio

from cpsim import ControlPlaneManager, ExecutionInstance, RequestMetadata

cp = ControlPlaneManager(scheduling_policy="adaptive", routing_strategy="load_balanced")
cp.register_instance(ExecutionInstance(instance_id="vllm-1", model_name="llama-3-70b",
                                       tensor_parallel_size=4, gpu_count=4))


async def serve() -> None:
    await cp.start()
    for i in range(5):
        await cp.submit_request(RequestMetadata(request_id=f"req-{i}", max_tokens=20,
                                                slo_deadline_ms=2000))
    await cp.drain(timeout_s=30)
    await cp.stop()


asyncio.run(serve())

# --- seed block (verbatim but for its import line) ---
metrics = cp.get_metrics()

# 请求指标
print(f"Total requests: {metrics.total_requests}")
print(f"Completed: {metrics.completed_requests}")
print(f"Failed: {metrics.failed_requests}")
print(f"Active: {metrics.active_requests}")
print(f"Queued: {metrics.queued_requests}")

# 延迟指标
print(f"Avg latency: {metrics.avg_latency_ms}ms")
print(f"P95 latency: {metrics.p95_latency_ms}ms")
print(f"P99 latency: {metrics.p99_latency_ms}ms")

# 吞吐指标
print(f"Tokens/sec: {metrics.tokens_per_second}")
print(f"Requests/sec: {metrics.requests_per_second}")

# SLO指标
print(f"SLO violations: {metrics.slo_violations}")
print(f"SLO compliance: {metrics.slo_compliance_rate:.2%}")

# 资源指标
print(f"GPU utilization: {metrics.avg_gpu_utilization:.2%}")
print(f"GPU memory used: {metrics.used_gpu_memory_gb}GB")
# --- end of seed block ---
