"""quick-start.md, "实例管理": list instances with their load, one instance's metrics, unregister."""

# Completion: the block works on a control plane `cp` with the instance "vllm-1" registered.
# All of these methods are plain (no event loop needed), as in the seed.
from cpsim import ControlPlaneManager, ExecutionInstance

cp = ControlPlaneManager()
cp.register_instance(ExecutionInstance(instance_id="vllm-1", model_name="llama-3-70b",
                                       tensor_parallel_size=4, gpu_count=4))

# --- seed block (verbatim but for its import line) ---
# 获取所有实例
instances = cp.get_instances()
for instance in instances:
    print(f"{instance.instance_id}: Load={instance.current_load:.2%}")

# 获取单个实例指标
metrics = cp.get_instance_metrics("vllm-1")
print(f"Active: {metrics['active_requests']}")
print(f"Latency: {metrics['avg_latency_ms']}ms")
print(f"Healthy: {metrics['is_healthy']}")

# 注销实例
cp.unregister_instance("vllm-1")
# --- end of seed block ---
