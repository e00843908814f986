"""Bad input at the edge raises ValueError naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from cpsim import (
    ControlPlane,
    ControlPlaneConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    ParallelismType,
    PDSeparationConfig,
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
