"""Turns a composed Hydra config into the objects of one simulation run (the only wiring place)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from backends.sim.autoscale import Pool
from backends.sim.cluster import ClusterSimulation, KVLink, ReplicaSpec, RunResult
from backends.sim.faults import Fault
from backends.sim.kv_capacity import num_kv_blocks
from backends.sim.replica import ReplicaConfig
from cpsim.core import ControlPlane, ControlPlaneConfig
from cpsim.metrics import MetricsCollector
from cpsim.models import load_model_spec
from cpsim.outliers import OutlierConfig
from cpsim.pricing import InstanceLatencyModels, latency_for
from cpsim.profiles import ProfiledLatencyModel
from cpsim.protocols import LatencyModel
from cpsim.types import (
    DecodingConfig,
    ExecutionInstance,
    PrefillingConfig,
)
from cpsim.validation import check_positive
from cpsim.workload import Workload

GROUP_KEYS = {
    "name",
    "count",
    "instance_type",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "expert_parallel_size",  # a MoE's experts over this many GPUs (beyond TP: wide EP)
    "cost_per_gpu_hour",
    "max_concurrent_requests",
    "profile",
    "model",  # the group's own model (default: the cluster's): several models at once
    "min_count",  # autoscaling bounds of the group's pool (default: count, a fixed pool)
    "max_count",
    "lora_adapters",  # LoRA adapters served beside the base model (requests name them)
    "max_loras",  # distinct adapters one batch may hold (vLLM's --max-loras)
    "lora_step_overhead_frac",  # a step's extra cost while an adapter runs
    "gpus_per_node",  # GPUs per node its replicas run on (default 8): where PP crosses nodes
    "calibration",  # the roofline's engine calibration (default: the one for its GPU)
}
# group keys its instances carry in their metadata
METADATA_KEYS = (
    "lora_adapters",
    "max_loras",
    "lora_step_overhead_frac",
    "gpus_per_node",
    "calibration",
)


@dataclass
class RunSetup:
    """Everything one run needs, built and not yet run. ``info`` goes to the result's
    ``info`` (``latency_models``: what prices each instance, and why)."""

    simulation: ClusterSimulation
    workload: Workload
    seed: int
    labels: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_instances(cluster: Mapping[str, Any], pd_enabled: bool) -> list[ExecutionInstance]:
    """One ExecutionInstance per replica of each group (``pd_groups`` when PD is on)."""
    groups = cluster["pd_groups"] if pd_enabled else cluster["groups"]
    replica = cluster.get("replica", {})
    out: list[ExecutionInstance] = []
    for group in groups:
        unknown = set(group) - GROUP_KEYS
        if unknown:
            raise ValueError(
                f"cluster group keys {sorted(unknown)} are unknown; allowed: {sorted(GROUP_KEYS)}"
            )
        check_positive("count", group["count"], integer=True)
        for i in range(group["count"]):
            out.append(
                ExecutionInstance(
                    instance_id=f"{group['name']}-{i}",
                    model_name=group.get("model", cluster["model"]),
                    tensor_parallel_size=group.get("tensor_parallel_size", 1),
                    pipeline_parallel_size=group.get("pipeline_parallel_size", 1),
                    expert_parallel_size=group.get("expert_parallel_size", 1),
                    gpu_type=cluster["gpu_type"],
                    gpu_memory_gb=cluster["gpu_memory_gb"],
                    cost_per_gpu_hour=group["cost_per_gpu_hour"],
                    max_concurrent_requests=group.get("max_concurrent_requests", 256),
                    instance_type=group.get("instance_type", "general"),
                    prefilling_config=PrefillingConfig(
                        max_num_batched_tokens=replica.get("max_num_batched_tokens", 8192),
                        enable_chunked_prefill=replica.get("enable_chunked_prefill", True),
                    ),
                    decoding_config=DecodingConfig(
                        max_parallel_requests=replica.get("max_num_seqs", 256),
                        block_size=replica.get("block_size", 16),
                        enable_prefix_caching=replica.get("enable_prefix_caching", True),
                    ),
                    # the group's own profile (conf/profile/): prices its replicas; its pool
                    metadata={"pool": group["name"]}
                    | ({"profile": group["profile"]} if group.get("profile") else {})
                    | {key: group[key] for key in METADATA_KEYS if group.get(key) is not None},
                )
            )
    return out


def core_config(core: Mapping[str, Any]) -> ControlPlaneConfig:
    """``core:`` of a run config as a ControlPlaneConfig (its ``outliers:`` as an
    OutlierConfig)."""
    settings = dict(core)
    outliers = OutlierConfig(**dict(settings.pop("outliers", None) or {}))
    return ControlPlaneConfig(**settings, outliers=outliers)


def build_replicas(
    cluster: Mapping[str, Any],
    profile: ProfiledLatencyModel | None,
    pd_enabled: bool,
    faults: list[Mapping[str, Any]] | None = None,
) -> list[ReplicaSpec]:
    """One replica per instance, each priced by its group's profile, else the run's
    ``profile`` where it fits, else a shipped profile or the roofline (cpsim.pricing).
    ``faults`` each name an ``instance_id`` or a cluster ``group`` (every instance of it:
    a ``link`` fault on the decode group is a partition between the PD pools)."""
    instances = build_instances(cluster, pd_enabled)
    groups: dict[str, list[str]] = {}
    for inst in instances:
        groups.setdefault(str(inst.metadata.get("pool")), []).append(inst.instance_id)
    by_instance: dict[str, list[Fault]] = {}
    for f in faults or []:
        f = dict(f)
        if "group" in f:
            group = f.pop("group")
            if group not in groups:
                raise ValueError(f"faults name unknown group {group!r}; known: {sorted(groups)}")
            targets = groups[group]
        else:
            targets = [f.pop("instance_id")]
        for iid in targets:
            by_instance.setdefault(iid, []).append(Fault(**f))
    replicas = []
    utilization = cluster.get("replica", {}).get("gpu_memory_utilization", 0.9)
    scheduler = cluster.get("replica", {}).get("scheduler", "mixed")
    for inst in instances:
        model = load_model_spec(inst.model_name)
        config = ReplicaConfig.from_instance(
            inst, gpu_memory_utilization=utilization, scheduler=scheduler
        )
        # an explicit count (what a real engine reported) wins over the memory estimate
        blocks = cluster.get("replica", {}).get("num_gpu_blocks") or num_kv_blocks(
            model,
            inst.gpu_memory_gb,
            inst.tensor_parallel_size,
            inst.pipeline_parallel_size,
            config.block_size,
            utilization,
            expert_parallel_size=inst.expert_parallel_size,
        )
        latency, source = latency_for(inst, inst.metadata.get("profile"), profile)
        faults_there = tuple(by_instance.pop(inst.instance_id, []))
        replicas.append(ReplicaSpec(inst, latency, model, blocks, config, faults_there, source))
    if by_instance:
        raise ValueError(
            f"faults name unknown instances {sorted(by_instance)}; "
            f"known: {[r.instance.instance_id for r in replicas]}"
        )
    return replicas


def build_pools(
    cluster: Mapping[str, Any], replicas: list[ReplicaSpec], pd_enabled: bool
) -> list[Pool]:
    """One pool per cluster group, between its ``min_count`` and ``max_count`` (default: its
    ``count``), its new replicas like its first, serving ``cluster.cold_start_s`` (default
    60 s) after they are asked for."""
    groups = cluster["pd_groups"] if pd_enabled else cluster["groups"]
    cold_start_s = float(cluster.get("cold_start_s", 60.0))
    pools = []
    for group in groups:
        first = next(r for r in replicas if r.instance.metadata.get("pool") == group["name"])
        count = int(group["count"])
        pools.append(
            Pool(
                name=group["name"],
                template=first,
                min_instances=int(group.get("min_count", count)),
                max_instances=int(group.get("max_count", count)),
                cold_start_s=cold_start_s,
            )
        )
    return pools


def build_run(cfg: DictConfig, labels: Mapping[str, str] | None = None) -> RunSetup:
    """Instantiate the policy, router, PD policy, profile, workload and cluster of ``cfg``.
    ``labels`` name the run in tables (default: the group options' class names)."""
    # ``profile=null``: none for the run; each instance priced by its group's profile, a
    # shipped one measured for it, or the analytical model
    profile = instantiate(cfg.profile) if cfg.get("profile") else None
    cluster = _plain(cfg.cluster)
    if profile is not None and profile.model not in (
        cluster["model"], load_model_spec(cluster["model"]).name
    ):  # fmt: skip
        raise ValueError(
            f"profile model {profile.model!r} does not match cluster model {cluster['model']!r}; "
            "choose a profile measured for the cluster's model, or none (override `~profile`)"
        )
    pd_policy = instantiate(cfg.pd) if cfg.get("pd") else None
    config = core_config(_plain(cfg.core))
    replicas = build_replicas(cluster, profile, pd_policy is not None, _plain(cfg.get("faults")))
    # policies predict each instance with the model that prices it
    per_instance = InstanceLatencyModels(
        {r.instance.instance_id: r.latency for r in replicas}, profile or replicas[0].latency
    )
    core = ControlPlane(
        policy=_with_latency_model(cfg.policy, per_instance),
        router=_seeded(cfg.router, cfg.seed),
        pd_policy=pd_policy,
        config=config,
        metrics=MetricsCollector(max_records=config.max_records, ttft_at=cfg.metrics.ttft_at),
        quotas=instantiate(cfg.quotas) if cfg.get("quotas") else None,
        links=instantiate(cfg.links) if cfg.get("links") else None,
    )
    autoscaler = instantiate(cfg.autoscaling) if cfg.get("autoscaling") else None
    pools = build_pools(cluster, replicas, pd_policy is not None) if autoscaler else []
    sim = ClusterSimulation(
        replicas,
        core,
        scrape_interval_s=cfg.scrape_interval_s,
        kv_link=KVLink(**_plain(cfg.kv_link)),
        progress=cfg.get("progress"),
        drain_timeout_s=cfg.drain_timeout_s,
        autoscaler=autoscaler,
        pools=pools,
        migration=instantiate(cfg.migration) if cfg.get("migration") else None,
        migration_mechanism=cfg.migration_mechanism,
        restart=instantiate(cfg.restart) if cfg.get("restart") else None,
        restart_s=float(cluster.get("cold_start_s", 60.0)),
    )
    names = dict(labels or {})
    names.setdefault("policy", _short(cfg.policy))
    names.setdefault("router", _short(cfg.router))
    names.setdefault("pd", _short(cfg.pd) if cfg.get("pd") else "off")
    info = {
        "latency_models": {r.instance.instance_id: r.latency_source for r in replicas},
        "usd_per_hour": sum(r.instance.cost_per_hour for r in replicas),
    }
    return RunSetup(sim, instantiate(cfg.workload), int(cfg.seed), names, info)


def run_setup(setup: RunSetup) -> RunResult:
    result = setup.simulation.run(setup.workload.requests(setup.seed))
    result.info.update(setup.info)
    return result


def _with_latency_model(node: DictConfig, latency_model: LatencyModel) -> Any:
    """Policies that predict service time get ``latency_model`` (the models that price the
    simulated steps), so they predict with what the simulation measures."""
    target = get_class(node["_target_"])
    if "latency_model" in inspect.signature(target).parameters and not node.get("latency_model"):
        return instantiate(node, latency_model=latency_model)
    return instantiate(node)


def _seeded(node: DictConfig, seed: int) -> Any:
    """Randomised options get the run's seed so one ``seed=`` reproduces the whole run."""
    return instantiate(node, seed=seed) if "seed" in node else instantiate(node)


def _short(node: Any) -> str:
    """A readable label from a group option: its class name without the role suffix."""
    target = str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    for suffix in ("PDPolicy", "Policy", "Router"):
        target = target.removesuffix(suffix)
    return target
