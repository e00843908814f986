"""Factories for hand-made request and instance views used by the policy tests.

They are fixtures (``make_request``, ``make_instance``) returning plain functions, so test
tables can hold keyword dicts and no test module imports ``conftest`` by name (which is
ambiguous once several test directories have one)."""

from __future__ import annotations

import heapq
import importlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cpsim.core import ControlPlane
from cpsim.protocols import PDPolicy, Router, SchedulingPolicy
from cpsim.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    ParallelismType,
    RequestMetadata,
    RequestPriority,
)
from cpsim.views import InstanceView, RequestView


def build_request(
    request_id: str = "r0",
    *,
    arrival_s: float = 0.0,
    seq: int | None = None,
    user_id: str = "u0",
    priority: RequestPriority | str = RequestPriority.NORMAL,
    slo_deadline_ms: float | None = None,
    max_tokens: int = 16,
    num_prompt_tokens: int | None = None,
    prompt_token_ids: tuple[int, ...] | None = None,
    prefix_block_ids: tuple[int, ...] | None = None,
    cost_budget: float | None = None,
    model_name: str | None = None,
    parallelism_hint: ParallelismType | str | None = None,
    **meta: Any,
) -> RequestView:
    """A queued request; ``seq`` defaults to a number parsed from the id's digits."""
    if num_prompt_tokens is None and prompt_token_ids is None and prefix_block_ids is None:
        num_prompt_tokens = 100
    metadata = RequestMetadata(
        request_id=request_id,
        user_id=user_id,
        priority=priority,  # type: ignore[arg-type]
        slo_deadline_ms=slo_deadline_ms,
        max_tokens=max_tokens,
        num_prompt_tokens=num_prompt_tokens,
        prompt_token_ids=prompt_token_ids,
        prefix_block_ids=prefix_block_ids,
        cost_budget=cost_budget,
        model_name=model_name,
        parallelism_hint=parallelism_hint,  # type: ignore[arg-type]
        **meta,
    )
    if seq is None:
        digits = "".join(ch for ch in request_id if ch.isdigit())
        seq = int(digits) if digits else 0
    return RequestView.of(metadata, arrival_s, seq)


def build_instance(
    instance_id: str = "i0",
    *,
    in_flight: int = 0,
    max_concurrent_requests: int = 10,
    num_running: int = 0,
    num_waiting: int = 0,
    pending_prefill_tokens: int = 0,
    kv_cache_usage_frac: float = 0.0,
    is_healthy: bool = True,
    instance_type: ExecutionInstanceType = ExecutionInstanceType.GENERAL,
    model_name: str = "m",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    gpu_count: int | None = None,
    gpu_type: str = "A100-80GB",
    gpu_memory_gb: float = 80.0,
    cost_per_gpu_hour: float = 2.0,
    recent_ttft_ms: float | None = None,
    recent_tpot_ms: float | None = None,
    adapters: frozenset[str] = frozenset(),
) -> InstanceView:
    """An instance snapshot; ``gpu_count`` defaults to tp x pp x dp."""
    if gpu_count is None:
        gpu_count = tensor_parallel_size * pipeline_parallel_size * data_parallel_size
    return InstanceView(
        instance_id=instance_id,
        model_name=model_name,
        instance_type=instance_type,
        is_healthy=is_healthy,
        in_flight=in_flight,
        pending_prefill_tokens=pending_prefill_tokens,
        max_concurrent_requests=max_concurrent_requests,
        num_running=num_running,
        num_waiting=num_waiting,
        kv_cache_usage_frac=kv_cache_usage_frac,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        data_parallel_size=data_parallel_size,
        expert_parallel_size=expert_parallel_size,
        gpu_count=gpu_count,
        gpu_type=gpu_type,
        gpu_memory_gb=gpu_memory_gb,
        cost_per_gpu_hour=cost_per_gpu_hour,
        recent_ttft_ms=recent_ttft_ms,
        recent_tpot_ms=recent_tpot_ms,
        adapters=adapters,
    )


@pytest.fixture
def make_request() -> Callable[..., RequestView]:
    return build_request


@pytest.fixture
def make_instance() -> Callable[..., InstanceView]:
    return build_instance


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: Constructor arguments that are objects, injected in code and never written in YAML.
NON_YAML_ARGS = frozenset({"rng", "latency_model"})


def yaml_options(group: str) -> list[Path]:
    return sorted((CONF_DIR / group).glob("*.yaml"))


def build_from_yaml(path: Path) -> tuple[Any, type, dict[str, Any]]:
    """Load a config-group option, import its ``_target_`` and call it with the other keys.
    Also checks that the keys are exactly the constructor's YAML-able arguments, each at its
    default, so the file documents the defaults."""
    config = yaml.safe_load(path.read_text())
    target = config.pop("_target_")
    module_name, _, class_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    params = {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if name not in NON_YAML_ARGS
    }
    assert set(config) == set(params), f"{path.name}: keys {sorted(config)} != {sorted(params)}"
    for key, value in config.items():
        assert value == params[key], f"{path.name}: {key}={value!r}, default {params[key]!r}"
    return cls(**config), cls, config


def drive_control_plane(
    policy: SchedulingPolicy,
    router: Router,
    pd_policy: PDPolicy | None = None,
    instances: Sequence[ExecutionInstance] | None = None,
    num_requests: int = 12,
    service_s: float = 0.5,
) -> pd.DataFrame:
    """A tiny event loop: requests arrive every 0.1 s, each phase takes ``service_s``
    (first token at a fifth of it); returns the per-request records."""
    cp = ControlPlane(policy, router, pd_policy)
    for inst in instances or default_cluster():
        cp.add_instance(inst, 0.0)
    events: list[tuple[float, int, str, str]] = []
    for i in range(num_requests):
        heapq.heappush(events, (0.1 * i, len(events), "arrive", f"r{i}"))
    metas = {f"r{i}": sample_metadata(i) for i in range(num_requests)}
    while events:
        now, _, kind, rid = heapq.heappop(events)
        if kind == "arrive":
            assert cp.on_arrival(metas[rid], now).accepted
        elif kind == "first":
            cp.on_first_token(rid, now)
        elif kind == "prefilled":
            cp.on_prefill_done(rid, now)
        else:
            cp.on_finish(rid, now, num_output_tokens=metas[rid].max_tokens)
        for d in cp.dispatch(now):
            done = "prefilled" if d.phase.value == "prefill" else "finish"
            if d.phase.value != "decode":
                heapq.heappush(events, (now + service_s / 5, len(events), "first", d.request_id))
            heapq.heappush(events, (now + service_s, len(events), done, d.request_id))
    assert cp.num_active == 0, f"{cp.num_active} requests never finished"
    return cp.metrics.records()


def default_cluster() -> list[ExecutionInstance]:
    return [
        ExecutionInstance("a", max_concurrent_requests=2, cost_per_gpu_hour=2.0),
        ExecutionInstance("b", max_concurrent_requests=2, tensor_parallel_size=2),
        ExecutionInstance("c", max_concurrent_requests=3, cost_per_gpu_hour=1.0),
    ]


def sample_metadata(i: int) -> RequestMetadata:
    """Mixed priorities, users, SLOs, budgets and prompts sharing prefixes."""
    shared = tuple(range(32)) if i % 2 else tuple(range(100, 132))
    return RequestMetadata(
        request_id=f"r{i}",
        user_id=f"u{i % 3}",
        priority=RequestPriority(i % 4),
        slo_deadline_ms=None if i % 3 == 0 else 2000.0 + 500 * i,
        max_tokens=4 + i,
        cost_budget=None if i % 4 else 1.0,
        prompt_token_ids=shared + tuple(range(i, i + 8 * (i + 1))),
    )


@pytest.fixture
def drive() -> Callable[..., pd.DataFrame]:
    return drive_control_plane


@pytest.fixture
def from_yaml() -> Callable[[Path], tuple[Any, type, dict[str, Any]]]:
    return build_from_yaml


@pytest.fixture
def flood() -> Callable[..., tuple[pd.DataFrame, list[tuple[float, RequestMetadata]]]]:
    """Runs experiments.fairness's flood (a user at 40 req/s beside one at 1 req/s) through
    the simulation composed from conf/ with the given overrides; returns the records and
    what was sent."""
    from experiments.fairness import flood_requests, simulate_flood

    def run(*overrides: str) -> tuple[pd.DataFrame, list[tuple[float, RequestMetadata]]]:
        requests = flood_requests()
        return simulate_flood(requests, *overrides), requests

    return run
