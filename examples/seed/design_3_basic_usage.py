"""control-plane-design.md, "基本使用": two instances, one HIGH request with a 1 s SLO, its status
after a second, the metrics. Complete as it is; runs on the default (simulated) backend."""

# --- seed block (verbatim but for its import line) ---
import asyncio
from cpsim import (
    ControlPlaneManager,
    RequestMetadata,
    ExecutionInstance,
    RequestPriority,
)

async def main():
    # 创建Control Plane
    cp = ControlPlaneManager(
        scheduling_policy="adaptive",  # 自适应调度
        routing_strategy="load_balanced",  # 负载均衡路由
        enable_monitoring=True,
    )
    
    # 注册vLLM实例
    instance1 = ExecutionInstance(
        instance_id="vllm-1",
        host="localhost",
        port=8000,
        model_name="llama-3-70b",
        tensor_parallel_size=4,
        gpu_count=4,
        gpu_memory_gb=80.0,
        max_concurrent_requests=100,
    )
    cp.register_instance(instance1)
    
    instance2 = ExecutionInstance(
        instance_id="vllm-2",
        host="localhost",
        port=8001,
        model_name="llama-3-70b",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        gpu_count=4,
        gpu_memory_gb=80.0,
        max_concurrent_requests=50,
    )
    cp.register_instance(instance2)
    
    # 启动Control Plane
    await cp.start()
    
    # 提交推理请求
    request = RequestMetadata(
        request_id="req-001",
        user_id="user-123",
        priority=RequestPriority.HIGH,
        slo_deadline_ms=1000,  # 1秒SLO
        max_tokens=100,
        model_name="llama-3-70b",
    )
    
    request_id = await cp.submit_request(request)
    print(f"Request submitted: {request_id}")
    
    # 查询状态
    await asyncio.sleep(1)
    status = await cp.get_request_status(request_id)
    print(f"Request status: {status}")
    
    # 获取指标
    metrics = cp.get_metrics()
    print(f"Metrics: {metrics}")
    
    # 停止Control Plane
    await cp.stop()

if __name__ == "__main__":
    asyncio.run(main())
# --- end of seed block ---
