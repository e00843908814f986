"""quick-start.md, "性能调优建议": switching policies, parallelism hints, switching routers."""

# Completion: the blocks use a control plane `cp` and these names without importing them.
from cpsim import ControlPlaneManager, RequestMetadata
from cpsim.types import ParallelismType

cp = ControlPlaneManager()

# --- seed block (verbatim but for its import line) ---
# 如果有严格SLO要求
cp.update_policy("slo_aware")

# 如果要最小化成本
cp.update_policy("cost_optimized")

# 不确定时用自适应
cp.update_policy("adaptive")
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
# 通过parallelism_hint提示
request = RequestMetadata(
    request_id="req-001",
    parallelism_hint=ParallelismType.TENSOR_PARALLEL,  # 提示TP
)

# 或让系统自动选择（推荐）
request = RequestMetadata(
    request_id="req-002",
    # 不设置hint，系统自动优化
)
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
# 需要缓存亲和性
cp.router.routing_strategy = "locality"

# 需要用户会话一致性
cp.router.routing_strategy = "affinity"

# 通用负载均衡
cp.router.routing_strategy = "load_balanced"
# --- end of seed block ---
