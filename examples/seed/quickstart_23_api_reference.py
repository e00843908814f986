"""quick-start.md, "API快速参考": every ControlPlaneManager method of the seed, called once.

Completion: the seed's block is a reference card, not a program. Its lines run here grouped
as in the card but in an order that makes a program (start first and stop last; an instance's
metrics read before it is unregistered), after the names they use (`cp`, `instance`,
`instance_id`, `request`, `request_id`, `policy_name`) are defined. The coroutines are awaited;
the other methods are plain, as in the seed."""

import asyncio

from cpsim import ControlPlaneManager, ExecutionInstance, RequestMetadata


async def main() -> None:
    cp = ControlPlaneManager()
    instance = ExecutionInstance(instance_id="vllm-1")
    instance_id = instance.instance_id
    request = RequestMetadata(request_id="req-001", max_tokens=50)
    request_id = request.request_id
    policy_name = "slo_aware"

    # 生命周期
    await cp.start()

    # 实例管理
    cp.register_instance(instance)
    cp.get_instances()
    cp.get_instance_metrics(instance_id)

    # 请求管理
    await cp.submit_request(request)
    await cp.get_request_status(request_id)
    await cp.cancel_request(request_id)

    # 监控
    cp.get_metrics()
    cp.get_status()

    # 策略
    cp.update_policy(policy_name)

    # 实例管理 (last: the instance is gone after this)
    cp.unregister_instance(instance_id)

    # 生命周期
    await cp.stop()


asyncio.run(main())
