"""Every option of every Hydra group composes with conf/config.yaml and builds its object."""

from __future__ import annotations

import inspect
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from cpsim.latency import StepBatch
from cpsim.models import load_model_spec
from cpsim.parallelism import GPUBudget
from cpsim.profiles import load_profile
from cpsim.protocols import (
    AdmissionPolicy,
    Autoscaler,
    MigrationPolicy,
    PDPolicy,
    Router,
    SchedulingPolicy,
)
from cpsim.types import RequestMetadata
from cpsim.workload import Workload, default_trace_dir
from experiments.autoscaling import study_runs
from experiments.build import build_instances, build_replicas, build_run
from experiments.schema import register
from experiments.study import grid, overrides_for

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = (
    "policy",
    "router",
    "pd",
    "cluster",
    "workload",
    "profile",
    "study",
    "parallelism",
    "quotas",
    "autoscaling",
    "migration",
    "restart",
    "links",
)
#: Groups the live manager uses, not the simulation config: each option is checked on its own.
STANDALONE = ("backend",)
#: Folders of other primary configs (conf/serve/config.yaml: ``cpsim serve``), tested below.
PRIMARY = ("serve",)
#: Options that set keys across the config (``# @package _global_``): conf/search/.
GLOBAL = ("search",)
#: Groups that conf/config.yaml's defaults list does not name (appended with ``+group=``).
APPENDED: tuple[str, ...] = ()

register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str], config_dir: Path = CONF_DIR) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _override(group: str, option: str) -> str:
    return f"{'+' if group in APPENDED else ''}{group}={option}"


CASES = [
    pytest.param(group, option, id=f"{group}={option}")
    for group in GROUPS
    for option in options(group)
]


def test_every_group_directory_is_covered() -> None:
    """A new group (a conf/ folder with options) must be added to GROUPS to be tested here."""
    dirs = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert dirs == set(GROUPS) | set(STANDALONE) | set(PRIMARY) | set(GLOBAL)
    assert all(options(g) for g in GROUPS)


def _paths(node: Any) -> Iterator[str]:
    """Every ``path`` value in a config node (trace files)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "path" and isinstance(value, str):
                yield value
            else:
                yield from _paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _paths(value)


def _skip_without_traces(node: DictConfig) -> None:
    plain = OmegaConf.to_container(node, resolve=True)
    for path in _paths(plain):
        if not (default_trace_dir() / path).exists():
            pytest.skip(f"trace {path} is absent from {default_trace_dir()} (../shared/traces)")


def _check_workload(node: DictConfig) -> None:
    _skip_without_traces(node)
    workload = instantiate(node)
    assert isinstance(workload, Workload)
    first = list(itertools.islice(workload.requests(0), 5))
    assert len(first) == 5
    times = [t for t, _ in first]
    assert times == sorted(times) and times[0] >= 0.0
    for _, request in first:
        assert isinstance(request, RequestMetadata) and request.prompt_tokens >= 1
        limit = node.get("max_context_tokens")
        if limit is not None:
            assert request.prompt_tokens + request.max_tokens <= limit


def _profile_for(model: str) -> str | None:
    """A profile option measured for ``model`` (short or full name), if there is one."""
    names = {model, load_model_spec(model).name}
    for option in options("profile"):
        if OmegaConf.load(CONF_DIR / "profile" / f"{option}.yaml").get("model") in names:
            return option
    return None


def _check_strategy(strategy: Any, option: str) -> None:
    """A layout for a model the strategy applies to: expert parallelism needs a MoE, data
    parallelism a model that fits one GPU, the others split a model that does not."""
    name = {"expert": "mixtral-8x7b", "data": "opt-13b"}.get(option, "opt-66b")
    model = load_model_spec(name)
    layout = strategy.plan(model, GPUBudget(num_gpus=8, gpu_memory_gb=80.0))
    assert 1 <= layout.gpu_count <= 8
    if option == "expert":
        assert layout.ep > 1


def _check_object(group: str, option: str, cfg: DictConfig) -> None:
    node = cfg[group]
    if group == "workload":
        _check_workload(node)
        return
    if group == "cluster":
        cluster = OmegaConf.to_container(node, resolve=True)
        matching = _profile_for(cluster["model"])
        # a profile of the cluster's model (a CPU cluster's GPU is a placeholder that only
        # its CPU profile prices); else the default, and each replica its fallback
        profile = load_profile(matching) if matching else instantiate(cfg.profile)
        for pd_on in (False, True):
            replicas = build_replicas(cluster, profile, pd_on)
            assert len(replicas) == len(build_instances(cluster, pd_on)) > 0
            assert all(r.num_gpu_blocks > 0 for r in replicas)
            assert all(r.latency_source for r in replicas)
        if matching is not None:  # the whole run builds with a profile of the cluster's model
            for pd_option in ("~pd", "pd=threshold"):
                overrides = [f"cluster={option}", f"profile={matching}", "workload=tiny", pd_option]
                build_run(compose_config(overrides))
        return
    if group == "study" and node.get("kind") == "autoscaling":
        assert set(node.scalers) <= set(options("autoscaling"))
        for _, overrides in study_runs(node):  # every run builds (nothing runs)
            build_run(compose_config([f"study={option}", *overrides, "workload=tiny"]))
        return
    if group == "study":
        runs = grid(node)
        assert runs and len({tuple(sorted(r.items())) for r in runs}) == len(runs)
        for key, values in (("policy", node.policies), ("router", node.routers)):
            assert set(values) <= set(options(key)), f"study names unknown {key} options"
        assert set(node.pd) <= {"off", *options("pd")}
        composed = compose_config([*overrides_for(runs[-1]), "workload=tiny"])
        assert composed.policy is not None
        return
    if group == "pd" and option == "off":  # no PD: a name for sweeps, an empty node
        assert not node and build_run(cfg).labels["pd"] == "off"
        return
    assert "_target_" in node, f"{group}/{option}.yaml has no _target_"
    obj = instantiate(node)
    if group == "policy":
        assert isinstance(obj, SchedulingPolicy)
    elif group == "router":
        assert isinstance(obj, Router)
    elif group == "pd":
        assert isinstance(obj, PDPolicy)
    elif group == "profile":
        assert obj.step_time_s(StepBatch(512, 512 * 512, 0, 1)) > 0.0
        assert obj.step_time_s(StepBatch(num_decode_seqs=8, decode_context_tokens=4096)) > 0.0
        short = obj.model.rsplit("/", 1)[-1]
        assert load_model_spec(short).name == obj.model
    elif group == "parallelism":
        _check_strategy(obj, option)
    elif group == "quotas":
        assert isinstance(obj, AdmissionPolicy)
    elif group == "autoscaling":
        assert isinstance(obj, Autoscaler)
    elif group == "migration":
        assert isinstance(obj, MigrationPolicy)


@pytest.mark.parametrize(("group", "option"), CASES)
def test_every_option_composes_and_instantiates(group: str, option: str) -> None:
    overrides = [_override(group, option)]
    if group != "workload":
        overrides.append("workload=tiny")  # no trace files needed
    cfg = compose_config(overrides)
    assert cfg[group] is not None
    _check_object(group, option, cfg)
    if group in ("policy", "router", "pd", "quotas", "autoscaling", "migration"):  # it builds
        setup = build_run(cfg)
        assert len(setup.simulation.procs) == 4


@pytest.mark.parametrize("option", options("search"))
def test_search_options_set_an_objective_and_build_a_run(option: str) -> None:
    cfg = compose_config([f"search={option}"])
    assert cfg.objective.slo and cfg.objective.penalty_usd_per_hour > 0
    _skip_without_traces(cfg.workload)
    assert build_run(cfg).info["usd_per_hour"] > 0


@pytest.mark.parametrize("option", options("parallelism"))
def test_parallelism_options_instantiate_from_their_files(option: str) -> None:
    node = OmegaConf.load(CONF_DIR / "parallelism" / f"{option}.yaml")
    _check_strategy(instantiate(node), option)


@pytest.mark.parametrize("option", options("backend"))
def test_backend_options_instantiate_from_their_files(option: str) -> None:
    node = OmegaConf.load(CONF_DIR / "backend" / f"{option}.yaml")
    target = get_class(node["_target_"])
    parameters = inspect.signature(target).parameters
    unknown = {k for k in node if not k.startswith("_")} - set(parameters)
    assert not unknown, f"backend/{option}.yaml keys {sorted(unknown)} are not arguments"
    backend = instantiate(node)  # constructors only store settings; start() does the I/O
    assert isinstance(backend, target)
    assert backend.scrape_interval_s == node.get("scrape_interval_s", 0.5)


def test_defaults_compose_to_the_main_study() -> None:
    cfg = compose_config([])
    assert cfg.pd is None and cfg.study is not None and cfg.seed == 0
    assert cfg.policy._target_.endswith("FIFOPolicy")


def one_llm_k8s_replica(*overrides: str) -> Any:
    """The one replica of the public vLLM 0.8.3 cluster's group, priced by the roofline."""
    cfg = compose_config(["cluster=llm_k8s_llama33_70b", "~profile", *overrides])
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    (replica,) = build_replicas(cluster, None, pd_enabled=False)
    return replica


def test_a_groups_gpus_per_node_places_its_pipeline_stages_on_nodes() -> None:
    """The public TP4 x PP2 run put one four-GPU pod on each node: its hand-off crosses them."""
    replica = one_llm_k8s_replica(
        "cluster.groups.0.tensor_parallel_size=4",
        "+cluster.groups.0.pipeline_parallel_size=2",
        "+cluster.groups.0.gpus_per_node=4",
    )
    assert replica.instance.gpus_per_node == 4
    assert replica.latency.inter_node_handoffs == 1
    assert "roofline" in replica.latency_source


def test_a_groups_expert_parallel_size_spreads_a_moe_over_its_gpus() -> None:
    replica = one_llm_k8s_replica(
        "cluster.model=mixtral-8x7b",
        "cluster.gpu_type=H100-SXM",
        "cluster.gpu_memory_gb=80",
        "cluster.groups.0.tensor_parallel_size=1",
        "+cluster.groups.0.expert_parallel_size=8",
    )
    assert replica.instance.expert_parallel_size == 8
    assert replica.latency.dispatches and replica.num_gpu_blocks > 0


@pytest.mark.parametrize(
    "override",
    [
        "scrape_intervl_s=1",  # typo in a top-level key
        "core.on_instance_failur=fail",  # typo in a nested key
        "kv_link.bandwidth_gbp=10",
        "scrape_interval_s=fast",  # wrong type (the schema says float)
        "core.max_attempts=many",
    ],
)
def test_bad_top_level_overrides_fail_at_compose_time(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_a_typo_in_the_config_file_fails_at_compose_time(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    compose_config([], conf)  # the copy composes as it is
    with (conf / "config.yaml").open("a") as f:
        f.write("scrape_intervl_s: 1.0\n")
    with pytest.raises(ConfigCompositionException, match="scrape_intervl_s"):
        compose_config([], conf)


@pytest.mark.parametrize(("group", "option"), [("policy", "nope"), ("router", "fastest")])
def test_unknown_group_option_fails_with_hydras_error(group: str, option: str) -> None:
    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/{option}'") as err:
        compose_config([f"{group}={option}"])
    assert all(name in str(err.value) for name in options(group))  # lists what is available


def compose_serve(overrides: list[str]) -> DictConfig:
    from experiments.schema import register_serve

    register_serve()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="serve/config", overrides=overrides)


@pytest.mark.parametrize("backend", options("backend"))
def test_the_serve_config_composes_with_every_backend(backend: str) -> None:
    pytest.importorskip("fastapi")
    cfg = compose_serve([f"backend={backend}", "server.port=8080"])
    assert cfg.server.port == 8080
    assert cfg.backend._target_.startswith("backends.")
    with pytest.raises(Exception, match="portt"):
        compose_serve(["server.portt=1"])


def test_cpsim_serve_builds_the_configured_gateway() -> None:
    pytest.importorskip("fastapi")
    from omegaconf import OmegaConf

    from experiments.serve import build_gateway

    cfg = compose_serve(["router=power_of_two", "policy=priority", "server.api_keys=[k]"])
    choices = {"router": "power_of_two", "policy": "priority"}
    gateway, engines = build_gateway(cfg, choices)
    assert engines == []
    manager = gateway.manager
    assert [i.instance_id for i in manager.get_instances()] == [
        "ondemand-0",
        "ondemand-1",
        "spot-0",
        "spot-1",
    ]
    assert manager.router.routing_strategy == "power_of_two"
    assert manager.core.policy.name == "priority"
    assert gateway.api_keys == {"k"}
    assert manager.backend.token_reports == "step"

    cfg = compose_serve(["backend=vllm_http", "cluster=vllm_endpoints"])
    gateway, _ = build_gateway(cfg, {})
    endpoints = [i.endpoint for i in gateway.manager.get_instances()]
    assert endpoints == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    cluster = OmegaConf.to_container(cfg.cluster)
    cluster["endpoints"][0]["colour"] = "red"
    from experiments.serve import endpoint_instances

    with pytest.raises(ValueError, match="colour"):
        endpoint_instances(cluster)
    with pytest.raises(ValueError, match="names no engines"):
        build_gateway(compose_serve(["backend=vllm_http"]), {"cluster": "small"})


def test_cpsim_serve_migration_runs_over_engines_and_is_refused_over_simulated_ones() -> None:
    pytest.importorskip("fastapi")
    from backends.live_migration import LiveMigration
    from experiments.serve import build_gateway

    cfg = compose_serve(
        ["backend=vllm_http", "cluster=vllm_endpoints", "migration=kv_balance",
         "migration.interval_s=0.5"]
    )  # fmt: skip
    gateway, _ = build_gateway(cfg, {})
    (mover,) = [s for s in gateway.services if isinstance(s, LiveMigration)]
    assert mover.policy.interval_s == 0.5 and mover.manager is gateway.manager
    with pytest.raises(ValueError, match="backend 'sim' cannot move running requests"):
        build_gateway(compose_serve(["migration=kv_balance"]), {})
