"""Autoscaling in the simulator (backends/sim/autoscale.py): a load step makes the pool grow
after cold starts, a lull drains it, and nothing is lost on the way."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from backends.sim.autoscale import Pool
from backends.sim.cluster import ClusterSimulation
from cpsim.types import RequestMetadata
from experiments.api import compose_config
from experiments.build import build_run

COLD_START_S = 60.0  # conf/cluster/autoscale_opt13b.yaml


def step_load(seed: int = 0) -> list[tuple[float, RequestMetadata]]:
    """1 req/s for 2 minutes, 10 req/s for 5 minutes, then 0.5 req/s for 10 minutes:
    Poisson, 600 prompt and 150 output tokens each."""
    rng = np.random.default_rng(seed)
    out, t, i = [], 0.0, 0
    for rate, until_s in ((1.0, 120.0), (10.0, 420.0), (0.5, 1020.0)):
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= until_s:
                t = until_s
                break
            out.append((t, RequestMetadata(f"r{i}", num_prompt_tokens=600, max_tokens=150)))
            i += 1
    return out


@pytest.fixture(scope="module", params=["target_utilization", "queue_slo", "predictive"])
def scaled(request: pytest.FixtureRequest) -> tuple[str, pd.DataFrame, pd.DataFrame, float]:
    cfg = compose_config("cluster=autoscale_opt13b", f"autoscaling={request.param}",
                         "workload=tiny")  # fmt: skip
    sent = step_load()
    result = build_run(cfg).simulation.run(sent)
    assert len(result.requests) == len(sent)
    return request.param, result.requests, result.scaling, result.info["gpu_hours"]


def test_nothing_is_lost_while_the_pool_grows_and_drains(scaled: tuple) -> None:
    _, records, scaling, _ = scaled
    assert records["request_id"].is_unique
    assert (records["status"] == "COMPLETED").all()  # drained instances finished their work
    provisioned = scaling["ready"] + scaling["starting"]
    assert provisioned.between(1, 10).all()  # the pool's min_count..max_count


def test_a_load_step_grows_the_pool_and_a_lull_shrinks_it(scaled: tuple) -> None:
    name, _, scaling, _ = scaled
    during = scaling[(scaling["time_s"] > 240) & (scaling["time_s"] <= 420)]
    lull = scaling[scaling["time_s"] > 900]
    assert during["ready"].max() >= 4, name  # 2 at the start; the step needs about 5
    assert lull["ready"].iloc[-1] <= 2, name
    assert (scaling["draining"] > 0).any()


def test_new_instances_serve_only_after_their_cold_start(scaled: tuple) -> None:
    _, records, scaling, _ = scaled
    first_ask = float(scaling.loc[scaling["starting"] > 0, "time_s"].min())
    first_use = records.groupby("instance_id", observed=True)["dispatch_time_s"].min()
    new = first_use[[iid not in ("engine-0", "engine-1") for iid in first_use.index]]
    assert len(new) and (new >= first_ask + COLD_START_S - 1e-9).all()


def test_gpu_hours_include_cold_starts_and_draining(scaled: tuple) -> None:
    _, _, scaling, gpu_hours = scaled
    dt = scaling["time_s"].diff().fillna(scaling["time_s"].iloc[0]).to_numpy()
    serving = float((scaling["ready"].to_numpy() * dt).sum()) / 3600
    paid = float(((scaling["ready"] + scaling["starting"] + scaling["draining"]) * dt).sum())
    assert gpu_hours > serving
    assert gpu_hours == pytest.approx(paid / 3600, rel=0.15)


def test_without_an_autoscaler_a_pool_keeps_its_count() -> None:
    cfg = compose_config("cluster=autoscale_opt13b", "workload=tiny")
    result = build_run(cfg).simulation.run(step_load()[:200])
    assert result.scaling.empty
    assert set(result.instances["instance_id"].astype(str)) == {"engine-0", "engine-1"}
    assert result.info["gpu_hours"] == pytest.approx(2 * result.sim_time_s / 3600)


def test_pools_need_an_autoscaler_and_sane_bounds() -> None:
    setup = build_run(compose_config("cluster=autoscale_opt13b", "workload=tiny"))
    spec = next(iter(setup.simulation.specs.values()))
    with pytest.raises(ValueError, match="max_instances=1 is below min_instances=2"):
        Pool("engine", spec, min_instances=2, max_instances=1)
    with pytest.raises(ValueError, match="pools are given but no autoscaler"):
        ClusterSimulation([spec], setup.simulation.cp, pools=[Pool("engine", spec, 1, 2)])
