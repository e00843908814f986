"""control-plane-design.md, "高级配置": SLO-aware scheduling with affinity routing, a request
with a parallelism hint and a cost budget."""

# Completion: the block uses these names without importing them.
from cpsim import ControlPlaneManager, RequestMetadata, RequestPriority

# --- seed block (verbatim but for its import line) ---
# 使用特定调度策略
cp = ControlPlaneManager(
    scheduling_policy="slo_aware",  # SLO感知调度
    routing_strategy="affinity",     # 用户亲和性路由
)

# 提交带并行提示的请求
from cpsim.types import ParallelismType

request = RequestMetadata(
    request_id="req-002",
    priority=RequestPriority.CRITICAL,
    slo_deadline_ms=500,
    parallelism_hint=ParallelismType.HYBRID,  # 提示使用混合并行
    cost_budget=0.01,  # 成本预算
)
# --- end of seed block ---
