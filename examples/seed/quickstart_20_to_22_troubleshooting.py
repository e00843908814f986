"""quick-start.md, "故障排查": requests stuck in the queue, high latency, unbalanced load."""

# Completion: the blocks work on a started control plane `cp` with two instances; the
# `ExecutionInstance(...)` of problem 2 is given an id (the one line changed, marked).
import asyncio

from cpsim import ControlPlaneManager, ExecutionInstance

cp = ControlPlaneManager(scheduling_policy="adaptive")
for name in ("vllm-1", "vllm-2"):
    cp.register_instance(ExecutionInstance(instance_id=name))


async def main() -> None:
    await cp.start()

    # --- seed block (verbatim but for its import line) ---
    # 检查是否有可用实例
    status = cp.get_status()
    print(f"Available instances: {status['available_instances']}")

    # 检查实例健康状态
    for instance in cp.get_instances():
        print(f"{instance.instance_id}: healthy={instance.is_healthy}")
    
    # 可能需要注册新实例或启动vLLM
    # --- end of seed block ---

    # --- seed block (verbatim but for its import line) ---
    # 检查SLO合规
    metrics = cp.get_metrics()
    print(f"SLO violations: {metrics.slo_violations}")

    # 尝试优先级调度
    cp.update_policy("priority")

    # 或增加实例
    new_instance = ExecutionInstance(instance_id="vllm-3")  # seed: ExecutionInstance(...)
    cp.register_instance(new_instance)
    # --- end of seed block ---

    # --- seed block (verbatim but for its import line) ---
    # 检查各实例负载
    for instance in cp.get_instances():
        inst_metrics = cp.get_instance_metrics(instance.instance_id)
        print(f"{instance.instance_id}: load={inst_metrics['current_load']:.2%}")

    # 切换路由策略
    cp.router.routing_strategy = "power_of_two"  # 更好的负载均衡

    # 或使用weighted_round_robin
    cp.load_balancer.select_instance(
        cp.get_instances(),
        algorithm="weighted_round_robin"
    )
    # --- end of seed block ---

    await cp.stop()


asyncio.run(main())
