"""control-plane-design.md, "动态策略切换": switch the scheduling policy at run time, read the status."""

# Completion: the block works on a control plane `cp` made earlier in the document.
from cpsim import ControlPlaneManager

cp = ControlPlaneManager(scheduling_policy="adaptive")

# --- seed block (verbatim but for its import line) ---
# 在运行时切换调度策略
cp.update_policy("cost_optimized")  # 切换到成本优化模式

# 获取Control Plane状态
status = cp.get_status()
print(f"Running: {status['running']}")
print(f"Policy: {status['scheduling_policy']}")
print(f"Pending: {status['pending_requests']}")
print(f"Running: {status['running_requests']}")
# --- end of seed block ---
