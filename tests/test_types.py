"""Bad input at the edge raises ValueError naming the field, the value and what is allowed."""

from __future__ import annotations

import re

import pytest

from backends.sim.replica import ReplicaConfig
from backends.vllm.engine_args import instance_engine_args
from cpsim import (
    ControlPlane,
    ControlPlaneConfig,
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    ParallelismType,
    PDSeparationConfig,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
    RequestStatus,
)
from policies import ROUTERS, SCHEDULING_POLICIES


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"request_id": ""}, "request_id=''"),
        ({"request_id": "r", "num_prompt_tokens": -1}, "num_prompt_tokens=-1"),
        ({"request_id": "r", "max_tokens": 0}, "max_tokens=0"),
        ({"request_id": "r", "slo_deadline_ms": 0}, "slo_deadline_ms=0"),
        ({"request_id": "r", "slo_deadline_ms": -5.0}, "slo_deadline_ms=-5.0"),
        ({"request_id": "r", "cost_budget": -1.0}, "cost_budget=-1.0"),
        ({"request_id": "r", "priority": "urgent"}, "priority='urgent'"),
        ({"request_id": "r", "parallelism_hint": "magic"}, "parallelism_hint='magic'"),
        ({"request_id": "r", "prompt_token_ids": [1, 2], "num_prompt_tokens": 3}, "disagrees"),
    ],
)
def test_request_metadata_rejects(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        RequestMetadata(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"prompt_token_ids": [1, 2, 3]}, 3),
        ({"prompt": "x" * 40}, 10),
        ({"num_prompt_tokens": 7}, 7),
        ({"prefix_block_ids": [1, 2], "prefix_block_size_tokens": 512}, 1024),
        ({}, 0),
    ],
)
def test_num_prompt_tokens_is_derived(kwargs: dict, expected: int) -> None:
    assert RequestMetadata("r", **kwargs).num_prompt_tokens == expected


def test_priority_accepts_names_and_orders_critical_first() -> None:
    assert RequestMetadata("r", priority="high").priority is RequestPriority.HIGH
    assert sorted([RequestPriority.LOW, RequestPriority.CRITICAL])[0] is RequestPriority.CRITICAL
    assert RequestStatus.COMPLETED.is_terminal and not RequestStatus.RUNNING.is_terminal
    hinted = RequestMetadata("r", parallelism_hint="hybrid")
    assert hinted.parallelism_hint is ParallelismType.HYBRID


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"instance_id": ""}, "instance_id=''"),
        ({"instance_id": "a", "tensor_parallel_size": 4, "gpu_count": 2}, "gpu_count=2"),
        ({"instance_id": "a", "tensor_parallel_size": 0}, "tensor_parallel_size=0"),
        ({"instance_id": "a", "max_concurrent_requests": 0}, "max_concurrent_requests=0"),
        ({"instance_id": "a", "instance_type": "gpu"}, "instance_type='gpu'"),
        ({"instance_id": "a", "cost_per_gpu_hour": -1}, "cost_per_gpu_hour=-1"),
    ],
)
def test_execution_instance_rejects(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ExecutionInstance(**kwargs)


def test_execution_instance_defaults() -> None:
    inst = ExecutionInstance(
        "a",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        data_parallel_size=2,
        instance_type="prefilling",
    )
    assert inst.gpu_count == 8
    assert inst.instance_type is ExecutionInstanceType.PREFILLING
    assert inst.endpoint == "http://localhost:8000"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"routing_policy": "magic"}, "routing_policy='magic'"),
        ({"prefilling_threshold_input_tokens": -1}, "prefilling_threshold_input_tokens=-1"),
        ({"kv_transfer_bandwidth_gbps": 0}, "kv_transfer_bandwidth_gbps=0"),
    ],
)
def test_pd_config_rejects(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PDSeparationConfig(**kwargs)


def test_core_config_rejects() -> None:
    with pytest.raises(ValueError, match="on_instance_failure='retry'"):
        ControlPlaneConfig(on_instance_failure="retry")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queue_len=-1"):
        ControlPlaneConfig(max_queue_len=-1)


def test_duplicate_ids_rejected() -> None:
    cp = ControlPlane(SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"]())
    cp.add_instance(ExecutionInstance("a"), 0.0)
    with pytest.raises(ValueError, match="instance_id='a' is already registered"):
        cp.add_instance(ExecutionInstance("a"), 0.0)
    cp.on_arrival(RequestMetadata("r"), 0.0)
    with pytest.raises(ValueError, match="request_id='r' is already active"):
        cp.on_arrival(RequestMetadata("r"), 0.0)
    with pytest.raises(ValueError, match="instance_id='zz' is not registered; registered: a"):
        cp.remove_instance("zz", 0.0)


def test_parallelism_type_short_names_are_aliases() -> None:
    assert ParallelismType.TP is ParallelismType.TENSOR_PARALLEL
    assert ParallelismType.PP is ParallelismType.PIPELINE_PARALLEL
    assert ParallelismType.DP is ParallelismType.DATA_PARALLEL
    assert ParallelismType.EP is ParallelismType.EXPERT_PARALLEL
    assert len(ParallelismType) == 5  # aliases add no members
    assert RequestMetadata("r", parallelism_hint="tp").parallelism_hint is ParallelismType.TP


def test_seed_configs_set_the_sequence_limit() -> None:
    prefill = ExecutionInstance(
        "p",
        tensor_parallel_size=4,
        instance_type=ExecutionInstanceType.PREFILLING,
        prefilling_config=PrefillingConfig(64, 4, True),  # the seed's fields, in its order
    )
    decode = ExecutionInstance(
        "d",
        instance_type=ExecutionInstanceType.DECODING,
        decoding_config=DecodingConfig(50, 200),
    )
    assert (prefill.max_num_seqs, decode.max_num_seqs) == (64, 200)
    assert decode.target_tpot_ms == 50 and prefill.target_tpot_ms is None
    capped = ExecutionInstance(
        "c", max_concurrent_requests=100, decoding_config=DecodingConfig(max_parallel_requests=200)
    )
    assert capped.max_num_seqs == 100
    both = ExecutionInstance(
        "g",
        prefilling_config=PrefillingConfig(target_batch_size=32),
        decoding_config=DecodingConfig(max_parallel_requests=48),
    )
    assert both.max_num_seqs == 32 and ExecutionInstance("x").max_num_seqs == 256
    assert ReplicaConfig.from_instance(prefill).max_num_seqs == 64
    assert instance_engine_args(decode) == {"max_num_seqs": 200}
    assert instance_engine_args(ExecutionInstance("x")) == {}  # vLLM's own default stays


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (
            lambda: ExecutionInstance(
                "p", tensor_parallel_size=2, prefilling_config=PrefillingConfig(64, 4)
            ),
            "prefilling_config.tensor_parallel_size=4 disagrees with the instance's "
            "tensor_parallel_size=2",
        ),
        (lambda: PrefillingConfig(target_batch_size=0), "target_batch_size=0"),
        (lambda: DecodingConfig(target_latency_ms=-1), "target_latency_ms=-1"),
        (lambda: DecodingConfig(max_parallel_requests=2.5), "max_parallel_requests=2.5"),
    ],
)
def test_seed_configs_reject(build, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        build()
