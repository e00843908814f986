"""quick-start.md, "查询请求状态": submit, read the status (QUEUED or RUNNING), cancel."""

# Completion: the block awaits at top level, so it runs inside a coroutine here, on a
# started control plane `cp` with one instance and a `request` made earlier in the guide.
import asyncio

from cpsim import ControlPlaneManager, ExecutionInstance, RequestMetadata


async def main() -> None:
    cp = ControlPlaneManager(scheduling_policy="adaptive")
    cp.register_instance(ExecutionInstance(instance_id="vllm-1", model_name="llama-3-70b",
                                           tensor_parallel_size=4, gpu_count=4))
    await cp.start()
    request = RequestMetadata(request_id="req-001", max_tokens=100)

    # --- seed block (verbatim but for its import line) ---
    # 提交请求
    request_id = "req-001"
    await cp.submit_request(request)

    # 查询状态
    status = await cp.get_request_status(request_id)
    print(status)  # RequestStatus.QUEUED or RUNNING

    # 取消请求（只能取消pending的）
    await cp.cancel_request(request_id)
    # --- end of seed block ---

    await cp.stop()


asyncio.run(main())
