"""quick-start.md, "5分钟快速开始", sections 1-7 in order: together they are one program."""

# --- seed block (verbatim but for its import line) ---
import asyncio
from cpsim import (
    ControlPlaneManager,
    ExecutionInstance,
    RequestMetadata,
    RequestPriority,
)
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
# 使用自适应调度策略（推荐）
cp = ControlPlaneManager(
    scheduling_policy="adaptive",      # 自动选择最佳策略
    routing_strategy="load_balanced",  # 负载均衡路由
    enable_monitoring=True,            # 启用监控
)
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
# 创建第一个实例（4 GPU张量并行）
instance1 = ExecutionInstance(
    instance_id="vllm-tp4",
    host="localhost",
    port=8000,
    model_name="llama-3-70b",
    tensor_parallel_size=4,
    gpu_count=4,
    gpu_memory_gb=80.0,
    max_concurrent_requests=100,
)
cp.register_instance(instance1)

# 创建第二个实例（混合并行）
instance2 = ExecutionInstance(
    instance_id="vllm-hybrid",
    host="localhost",
    port=8001,
    model_name="llama-3-70b",
    tensor_parallel_size=2,
    pipeline_parallel_size=2,
    gpu_count=4,
    gpu_memory_gb=80.0,
    max_concurrent_requests=80,
)
cp.register_instance(instance2)
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
async def main():
    # 启动后台任务
    await cp.start()
    print("✓ Control Plane started")
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
    # 创建高优先级请求
    request = RequestMetadata(
        request_id="req-001",
        user_id="user-123",
        priority=RequestPriority.HIGH,
        slo_deadline_ms=1000,      # 1秒SLO
        max_tokens=100,
        model_name="llama-3-70b",
    )
    
    # 提交请求
    await cp.submit_request(request)
    print("✓ Request submitted")
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
    # 等待处理
    await asyncio.sleep(2)
    
    # 获取指标
    metrics = cp.get_metrics()
    print(f"Completed: {metrics.completed_requests}")
    print(f"Failed: {metrics.failed_requests}")
    print(f"Avg Latency: {metrics.avg_latency_ms:.2f}ms")
    print(f"SLO Compliance: {metrics.slo_compliance_rate:.2%}")
    
    # 获取系统状态
    status = cp.get_status()
    print(f"Running: {status['running_requests']}")
    print(f"Queued: {status['pending_requests']}")
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
    # 停止所有后台任务
    await cp.stop()
    print("✓ Control Plane stopped")

# 运行
asyncio.run(main())
# --- end of seed block ---
