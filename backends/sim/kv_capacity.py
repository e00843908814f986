"""KV-cache blocks of a replica: GPU memory x utilization - weights - activations."""

from __future__ import annotations

from cpsim.models import ModelSpec
from cpsim.parallelism import weight_bytes_per_gpu
from cpsim.validation import check_non_negative, check_positive, check_range

GIB = 1024**3


def num_kv_blocks(
    model: ModelSpec,
    gpu_memory_gib: float,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    activation_reserve_gib: float = 1.0,
    expert_parallel_size: int = 1,
) -> int:
    """KV blocks of one replica (tp x pp GPUs of ``gpu_memory_gib`` each, NVIDIA's "80GB"
    being 80 GiB).

    Per GPU: usable = memory x utilization - weights - activation reserve (vLLM profiles peak
    activations; 1 GiB is a typical figure at 8k batched tokens), its weights being 1/pp of
    the layers, 1/tp of each and 1/max(tp, ep) of a MoE's routed experts. A block holds
    ``block_size`` tokens of K and V for the GPU's share of layers (1/pp) and KV heads (1/tp),
    so every GPU holds the same number of blocks and the replica has that many."""
    check_positive("gpu_memory_gib", gpu_memory_gib)
    check_positive("tensor_parallel_size", tensor_parallel_size, integer=True)
    check_positive("pipeline_parallel_size", pipeline_parallel_size, integer=True)
    check_positive("block_size", block_size, integer=True)
    check_range("gpu_memory_utilization", gpu_memory_utilization, 0.01, 1.0)
    check_non_negative("activation_reserve_gib", activation_reserve_gib)
    check_positive("expert_parallel_size", expert_parallel_size, integer=True)
    usable = gpu_memory_gib * GIB * gpu_memory_utilization
    weights = weight_bytes_per_gpu(
        model, tensor_parallel_size, expert_parallel_size, 1.0 / pipeline_parallel_size
    )
    reserve = activation_reserve_gib * GIB
    free = usable - weights - reserve
    # KV heads are split across TP ranks (replicated when fewer heads than ranks)
    kv_share = max(1.0 / tensor_parallel_size, 1.0 / model.num_kv_heads)
    bytes_per_block = block_size * model.kv_bytes_per_token() * kv_share / pipeline_parallel_size
    if free < bytes_per_block:
        raise ValueError(
            f"{model.name} does not fit: {weights / GIB:.1f} GiB of weights per GPU plus "
            f"{activation_reserve_gib} GiB of activations exceed {usable / GIB:.1f} GiB "
            f"({gpu_memory_gib} GiB x gpu_memory_utilization={gpu_memory_utilization}) with "
            f"tensor_parallel_size={tensor_parallel_size}, "
            f"pipeline_parallel_size={pipeline_parallel_size}, "
            f"expert_parallel_size={expert_parallel_size}; use more GPUs or a larger GPU"
        )
    return int(free // bytes_per_block)
