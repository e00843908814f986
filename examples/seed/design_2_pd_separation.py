"""control-plane-design.md, "2. PD 分离": a prefill instance (TP=4, batches of 64) and a decode
instance (TPOT target 50 ms, 200 sequences) under adaptive PD routing. Complete as it is."""

# --- seed block (verbatim but for its import line) ---
from cpsim import (
    ControlPlaneManager,
    ExecutionInstance,
    ExecutionInstanceType,
    PrefillingConfig,
    DecodingConfig,
    PDSeparationConfig,
)

# 启用 PD 分离
pd_config = PDSeparationConfig(
    enabled=True,
    routing_policy="adaptive",
    prefilling_threshold_input_tokens=800,
)

manager = ControlPlaneManager(
    scheduling_policy="adaptive",
    enable_pd_separation=True,
    pd_config=pd_config,
)

# 注册 Prefilling 专用实例
prefilling_instance = ExecutionInstance(
    instance_id="prefilling-1",
    host="localhost",
    port=8001,
    model_name="llama-7b",
    tensor_parallel_size=4,
    gpu_count=4,
    instance_type=ExecutionInstanceType.PREFILLING,
    prefilling_config=PrefillingConfig(
        target_batch_size=64,
        tensor_parallel_size=4,
        enable_chunked_prefill=True,
    ),
)

# 注册 Decoding 专用实例
decoding_instance = ExecutionInstance(
    instance_id="decoding-1",
    host="localhost",
    port=8002,
    model_name="llama-7b",
    tensor_parallel_size=1,
    gpu_count=1,
    instance_type=ExecutionInstanceType.DECODING,
    decoding_config=DecodingConfig(
        target_latency_ms=50,
        max_parallel_requests=200,
    ),
)

manager.register_instance(prefilling_instance)
manager.register_instance(decoding_instance)
# --- end of seed block ---
