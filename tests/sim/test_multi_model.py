"""Several models at once: each request runs on its model's pool, metrics per model, and an
autoscaler sizes each model's pool by that model's load."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cpsim.manager import ControlPlaneManager
from cpsim.types import ExecutionInstance, RequestMetadata
from experiments.api import compose_config, simulate
from experiments.build import build_run

MODEL_OF_GROUP = {"opt13b": "opt-13b", "llama8b": "llama-3-8b"}


def test_each_request_runs_on_its_models_pool_with_metrics_per_model() -> None:
    result = simulate("cluster=multi_model", "workload=multi_model", "workload.num_requests=600")
    records = result.requests
    assert (records["status"] == "COMPLETED").all()
    group = records["instance_id"].astype(str).str.rsplit("-", n=1).str[0]
    assert (group.map(MODEL_OF_GROUP) == records["model_name"].astype(str)).all()
    models = result.metrics.models
    assert set(models) == {"opt-13b", "llama-3-8b"}
    assert sum(m.completed_requests for m in models.values()) == 600
    # Llama-3-8B's steps are cheaper than OPT-13B's: its tokens come faster
    assert models["llama-3-8b"].p50_tpot_ms < models["opt-13b"].p50_tpot_ms
    assert "calibration vllm-a100-80gb" in result.info["latency_models"]["llama8b-0"]


def test_an_autoscaler_sizes_each_models_pool_by_its_own_load() -> None:
    """All the traffic asks for OPT-13B: its pool grows, the Llama pool shrinks to its min."""
    cfg = compose_config(
        "cluster=multi_model",
        "workload=multi_model",
        "workload.mix.models={opt-13b: 1.0}",
        "workload.arrival.rate_rps=8.0",
        "workload.num_requests=4000",
        "autoscaling=target_utilization",
    )
    result = build_run(cfg).simulation.run(build_run(cfg).workload.requests(0))
    scaling = result.scaling
    by_pool = scaling.groupby("pool", observed=True)["ready"].agg(["max", "last"])
    assert by_pool.loc["opt13b", "max"] > 2
    assert by_pool.loc["llama8b", "last"] == 1 and by_pool.loc["llama8b", "max"] == 2
    assert (result.requests["status"] == "COMPLETED").all()


def test_the_manager_reports_each_model() -> None:
    async def main() -> dict:
        cp = ControlPlaneManager(enable_monitoring=False)
        for i, model in enumerate(("opt-13b", "llama-3-8b")):
            cp.register_instance(
                ExecutionInstance(f"i{i}", model_name=model, gpu_type="A100-80GB")
            )
        await cp.start()
        rng = np.random.default_rng(0)
        for k in range(6):
            model = ("opt-13b", "llama-3-8b")[k % 2]
            await cp.submit_request(
                RequestMetadata(
                    f"r{k}", model_name=model, num_prompt_tokens=int(rng.integers(50, 200)),
                    max_tokens=8,
                )
            )  # fmt: skip
        await cp.drain(timeout_s=60)
        records = cp.get_request_records()
        metrics = cp.get_metrics()
        await cp.stop()
        return {"records": records, "metrics": metrics}

    out = asyncio.run(main())
    records, metrics = out["records"], out["metrics"]
    served = dict(zip(records["request_id"], records["instance_id"].astype(str), strict=True))
    assert all(served[f"r{k}"] == f"i{k % 2}" for k in range(6))
    assert {m: s.completed_requests for m, s in metrics.models.items()} == {
        "opt-13b": 3,
        "llama-3-8b": 3,
    }
    assert "models" not in metrics.as_dict()


def test_a_group_model_must_be_known() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        build_run(compose_config("cluster=multi_model", "workload=tiny",
                                 "cluster.groups.1.model=gpt-9"))  # fmt: skip
