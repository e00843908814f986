"""quick-start.md, "动态策略切换": start with FIFO, switch to adaptive."""

# Completion: the block uses this name without importing it.
from cpsim import ControlPlaneManager

# --- seed block (verbatim but for its import line) ---
# 初始策略
cp = ControlPlaneManager(scheduling_policy="fifo")

# 后期切换
cp.update_policy("adaptive")       # 切换到自适应
print(cp.get_status()['scheduling_policy'])  # 查看当前策略
# --- end of seed block ---
