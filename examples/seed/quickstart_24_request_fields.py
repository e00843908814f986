"""quick-start.md, "RequestMetadata 常用字段": every common field of a request."""

# Completion: the block uses these names without importing them.
from cpsim import RequestMetadata, RequestPriority
from cpsim.types import ParallelismType

# --- seed block (verbatim but for its import line) ---
RequestMetadata(
    request_id="unique-id",              # 必需
    user_id="user-123",                  # 可选
    priority=RequestPriority.NORMAL,     # 优先级
    slo_deadline_ms=1000,                # SLO截止时间
    max_tokens=100,                      # 最大生成token数
    model_name="llama-3-70b",            # 模型名
    cost_budget=0.01,                    # 成本预算
    parallelism_hint=ParallelismType.TP, # 并行策略提示
)
# --- end of seed block ---
