"""LoRA adapters in the simulator: requests naming an adapter run only where it is served,
a batch holds at most ``max_loras`` distinct adapters (the others wait, as vLLM's scheduler
skips them), and a step with an adapter in it costs ``lora_step_overhead_frac`` more."""

from __future__ import annotations

import pandas as pd
import pytest

from backends.sim.request import SimRequest
from cpsim.types import RequestMetadata
from experiments.api import compose_config, simulate
from experiments.build import build_run
from tests.sim.conftest import drive, make_replica


def lora_request(rid: str, adapter: str | None, prompt: int = 50, output: int = 20) -> SimRequest:
    req = SimRequest(rid, prompt, output)
    req.lora = adapter
    return req


@pytest.mark.parametrize("fast", [False, True])
def test_a_batch_holds_at_most_max_loras_adapters_and_the_base_model_runs_beside(  # type: ignore[no-untyped-def]
    latency, fast
) -> None:
    rep = make_replica(latency, lora_adapters=("a", "b"), max_loras=1)
    for rid, adapter in [("a1", "a"), ("b1", "b"), ("base", None), ("a2", "a"), ("x", "z")]:
        rep.add_request(lora_request(rid, adapter))
    rep.update_from_output(rep.schedule())
    rep.check()
    # b1 waits for adapter a's requests to finish; the base model's and an adapter the
    # replica does not serve (run as the base model) pass it
    assert rep.running_ids() == ["a1", "base", "a2", "x"] and rep.waiting_ids() == ["b1"]
    done, _ = drive(rep, fast)  # request id -> [first token, finish, request]
    # b1's first token comes once adapter a's requests have finished
    assert done["b1"][0] > max(done["a1"][1], done["a2"][1])


def test_with_room_for_two_adapters_both_run_at_once(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, lora_adapters=("a", "b", "c"), max_loras=2)
    for rid, adapter in [("a1", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b")]:
        rep.add_request(lora_request(rid, adapter))
    rep.update_from_output(rep.schedule())
    rep.check()
    assert rep.running_ids() == ["a1", "b1", "b2"] and rep.waiting_ids() == ["c1"]


def run_one(overrides: list[str], model: str) -> pd.Series:
    setup = build_run(compose_config("cluster=lora_opt13b", *overrides))
    request = RequestMetadata("r", model_name=model, num_prompt_tokens=500, max_tokens=100)
    records = setup.simulation.run(iter([(0.0, request)]), total=1).requests
    return records.iloc[0]


def test_a_step_with_an_adapter_costs_its_overhead_more() -> None:
    group = ("{name: lora, count: 1, cost_per_gpu_hour: 4.1, lora_adapters: [sql], "
             "lora_step_overhead_frac: %s}")  # fmt: skip
    only_lora = [f"cluster.groups=[{group % 0.0}]"]
    overhead = [f"cluster.groups=[{group % 0.5}]"]
    base = run_one(overhead, "opt-13b")
    adapter = run_one(overhead, "sql")
    assert adapter["tpot_ms"] == pytest.approx(1.5 * base["tpot_ms"], rel=1e-6)
    assert adapter["ttft_ms"] > 1.4 * base["ttft_ms"]
    free = run_one(only_lora, "sql")
    assert free["tpot_ms"] == pytest.approx(base["tpot_ms"], rel=1e-6)


def test_adapter_requests_run_only_where_served_and_are_reported_per_adapter() -> None:
    result = simulate("cluster=lora_opt13b", "workload=lora", "workload.num_requests=400")
    records = result.requests
    assert len(records) == 400 and (records["status"] == "COMPLETED").all()
    model = records["model_name"].astype(str)
    where = records["instance_id"].astype(str).str.rsplit("-", n=1).str[0]
    assert (where[model != "opt-13b"] == "lora").all()
    assert set(where[model == "opt-13b"]) == {"lora", "base"}
    models = result.metrics.models
    assert set(models) == {"opt-13b", "sql", "chat", "summarize"}
    assert sum(m.completed_requests for m in models.values()) == 400


def test_max_loras_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_loras"):
        simulate("cluster=lora_opt13b", "workload=lora", "workload.num_requests=10",
                 "cluster.groups.0.max_loras=0")  # fmt: skip
