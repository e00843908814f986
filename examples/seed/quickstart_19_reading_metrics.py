"""quick-start.md, "性能指标解读": the key metrics, and switching policy on what they say."""

# Completion: the block reads the metrics of a control plane `cp` that has served requests;
# here two instances serve eight with a 1 s SLO on the default (simulated) backend first.
import asyncio

from cpsim import ControlPlaneManager, ExecutionInstance, RequestMetadata

cp = ControlPlaneManager(scheduling_policy="adaptive")
for name in ("vllm-1", "vllm-2"):
    cp.register_instance(ExecutionInstance(instance_id=name, model_name="llama-3-70b",
                                           tensor_parallel_size=4, gpu_count=4))


async def serve() -> None:
    await cp.start()
    for i in range(8):
        await cp.submit_request(RequestMetadata(request_id=f"req-{i}", max_tokens=50,
                                                slo_deadline_ms=1000))
    await cp.drain(timeout_s=30)
    await cp.stop()


asyncio.run(serve())

# --- seed block (verbatim but for its import line) ---
metrics = cp.get_metrics()

# 关键指标
print(f"吞吐量: {metrics.requests_per_second:.2f} req/s")
print(f"平均延迟: {metrics.avg_latency_ms:.2f}ms")
print(f"尾延迟(p95): {metrics.p95_latency_ms:.2f}ms")
print(f"尾延迟(p99): {metrics.p99_latency_ms:.2f}ms")
print(f"SLO遵守率: {metrics.slo_compliance_rate:.2%}")

# 如果SLO遵守率低
if metrics.slo_compliance_rate < 0.95:
    cp.update_policy("slo_aware")  # 切换到SLO感知
    
# 如果成本过高
if metrics.cost_per_token > 0.001:
    cp.update_policy("cost_optimized")  # 切换到成本优化
# --- end of seed block ---
