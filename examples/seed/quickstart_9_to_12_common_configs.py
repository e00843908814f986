"""quick-start.md, "常见配置": the four configurations (strict SLO, batch, mixed, cache)."""

# Completion: the blocks use these names without importing them.
from cpsim import ControlPlaneManager, RequestMetadata, RequestPriority

# --- seed block (verbatim but for its import line) ---
cp = ControlPlaneManager(
    scheduling_policy="slo_aware",     # SLO感知调度
    routing_strategy="affinity",        # 用户亲和路由
    enable_monitoring=True,
)

# 提交带SLO的请求
request = RequestMetadata(
    request_id="req-critical",
    priority=RequestPriority.HIGH,
    slo_deadline_ms=500,  # 严格：500ms
)
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
cp = ControlPlaneManager(
    scheduling_policy="cost_optimized",  # 成本优化
    routing_strategy="load_balanced",
)

# 提交带成本预算的请求
request = RequestMetadata(
    request_id="req-batch",
    priority=RequestPriority.LOW,
    cost_budget=0.05,  # $0.05预算
    max_tokens=500,
)
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
cp = ControlPlaneManager(
    scheduling_policy="adaptive",        # 自适应（推荐）
    routing_strategy="load_balanced",
    enable_monitoring=True,
)
# --- end of seed block ---

# --- seed block (verbatim but for its import line) ---
cp = ControlPlaneManager(
    scheduling_policy="priority",
    routing_strategy="locality",  # 哈希路由提高缓存命中
)
# --- end of seed block ---
