"""``cpsim serve`` (or ``python -m experiments.serve``): the OpenAI-compatible gateway.

Composes conf/serve/config.yaml: the cluster's instances are registered with a
``ControlPlaneManager`` over the chosen backend, with the chosen policy, router and PD
policy, and ``cpsim.serve.app`` serves them under uvicorn. With ``backend=vllm_http`` a
cluster with a ``vllm:`` section has its engines started by the launcher (and stopped when
the gateway stops); one with ``endpoints:`` names engines already running. With
``backend=sim`` the replicas are simulated in wall time: the whole server runs with no engine.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import signal
from collections.abc import Mapping
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cpsim.manager import ControlPlaneManager
from cpsim.pricing import InstanceLatencyModels, latency_for
from cpsim.types import ExecutionInstance
from experiments.build import _with_latency_model, build_instances, core_config
from experiments.schema import register_serve

log = logging.getLogger("cpsim.serve")
register_serve()

#: collect only after this many net allocations (see freeze_start_up_objects)
GC_GEN0_THRESHOLD = 50_000

ENDPOINT_KEYS = {
    "host", "port", "instance_type", "tensor_parallel_size", "pipeline_parallel_size",
    "cost_per_gpu_hour", "max_concurrent_requests", "max_model_len", "instance_id",
}


def endpoint_instances(cluster: Mapping[str, Any]) -> list[ExecutionInstance]:
    """One instance per entry of ``cluster["endpoints"]`` (engines already running)."""
    out = []
    for i, entry in enumerate(cluster["endpoints"]):
        entry = dict(entry)
        unknown = set(entry) - ENDPOINT_KEYS
        if unknown:
            raise ValueError(
                f"endpoints[{i}] keys {sorted(unknown)} are unknown; allowed: "
                f"{sorted(ENDPOINT_KEYS)}"
            )
        limit = entry.pop("max_model_len", None)
        out.append(
            ExecutionInstance(
                instance_id=entry.pop("instance_id", f"engine-{i}"),
                model_name=cluster["model"],
                gpu_type=cluster.get("gpu_type", "A100-80GB"),
                gpu_memory_gb=cluster.get("gpu_memory_gb", 80.0),
                metadata={} if limit is None else {"max_model_len": int(limit)},
                **entry,
            )
        )
    return out


def build_gateway(cfg: DictConfig, choices: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """The gateway of ``cfg`` and the engines launched for it (to stop at the end)."""
    from backends.sim.live import SimBackend
    from cpsim.serve.app import Gateway, ServerSettings

    cluster: dict[str, Any] = OmegaConf.to_container(cfg.cluster, resolve=True)  # type: ignore[assignment]
    backend = instantiate(cfg.backend)
    pd_on = bool(cfg.get("pd"))
    if cfg.get("restart") and cfg.get("autoscaling"):
        raise ValueError(
            "restart= and autoscaling= together are not supported: the engine supervisor "
            "watches the engines of start-up, not those the autoscaler starts; choose one"
        )
    engines: list[Any] = []
    launcher: Any = None
    if isinstance(backend, SimBackend):
        backend.token_reports = "step"  # clients see tokens as the engine steps
        instances = build_instances(cluster, pd_on)
    elif cluster.get("endpoints"):
        instances = endpoint_instances(cluster)
    elif cluster.get("vllm"):
        from backends.vllm.launcher import launch

        section = dict(cluster["vllm"])
        if pd_on and not section.get("kv_shared_storage_path"):
            raise ValueError("pd needs cluster.vllm.kv_shared_storage_path (a KV connector)")
        log.info("starting %s vLLM servers ...", section.get("num_instances", 1))
        if cfg.get("autoscaling"):
            launcher = vllm_pool_launcher(cluster, pd_on)
            instances = launcher.start_first(int(section.get("num_instances", 1)))
            engines = launcher.engines  # stopping one never started does nothing
        else:
            engines = launch(cluster)
            instances = [e.instance for e in engines]
    else:
        raise ValueError(
            f"cluster {choices.get('cluster')!r} names no engines for backend "
            f"{backend.name!r}: give it `endpoints:` (running servers) or `vllm:` (the "
            "launcher starts them), or serve with backend=sim"
        )
    profile = instantiate(cfg.profile) if cfg.get("profile") else None
    manager = ControlPlaneManager(
        scheduling_policy=str(choices.get("policy", "fifo")),
        routing_strategy=str(choices.get("router", "load_balanced")),
        enable_pd_separation=pd_on,
        # /metrics is the gateway's monitoring; a periodic summary of every record kept
        # would stall the event loop under load
        enable_monitoring=False,
        backend=backend,
        config=core_config(OmegaConf.to_container(cfg.core, resolve=True)),  # type: ignore[arg-type]
    )
    # the configured objects, knobs and all, in place of the registry defaults
    manager.core.policy = instantiate(cfg.policy)
    if profile is not None:  # each instance priced (simulated) and predicted by its own model
        models = {}
        for instance in instances:
            model, _ = latency_for(instance, instance.metadata.get("profile"), profile)
            models[instance.instance_id] = instance.metadata["latency_model"] = model
        per_instance = InstanceLatencyModels(models, profile)
        manager.core.policy = _with_latency_model(cfg.policy, per_instance)
    manager.router.use(instantiate(cfg.router), str(choices.get("router", "load_balanced")))
    manager.core.pd_policy = instantiate(cfg.pd) if pd_on else None
    manager.core.quotas = instantiate(cfg.quotas) if cfg.get("quotas") else None
    manager.core.links = instantiate(cfg.links) if cfg.get("links") else None
    for instance in instances:
        manager.register_instance(instance)
    settings = ServerSettings(**OmegaConf.to_container(cfg.server, resolve=True))  # type: ignore[arg-type]
    gateway = Gateway(manager, settings)
    if cfg.get("restart"):
        gateway.services.append(engine_supervisor(manager, instantiate(cfg.restart), engines))
    if cfg.get("autoscaling"):
        scaling = pool_autoscaling(manager, cfg.autoscaling, cluster, pd_on, instances,
                                   launcher, drain_timeout_s=settings.drain_timeout_s)  # fmt: skip
        gateway.services.append(scaling)
    if cfg.get("migration"):
        from backends.live_migration import LiveMigration

        gateway.services.append(LiveMigration(manager, instantiate(cfg.migration)))
    return gateway, engines


def vllm_pool_launcher(cluster: Mapping[str, Any], pd_on: bool) -> Any:
    """The launcher of an autoscaled pool of vLLM servers: up to the cluster group's
    ``max_count`` engines, ``vllm.num_instances`` of them started first."""
    from backends.vllm.pool_launcher import VLLMInstanceLauncher

    if pd_on:
        raise ValueError(
            "autoscaling= over launched vLLM servers serves one pool of general engines; "
            "with pd, autoscale simulated replicas (backend=sim)"
        )
    section = dict(cluster["vllm"])
    low, high = vllm_pool_bounds(cluster)
    log.info("autoscaling vLLM servers: %d to %d", low, high)
    return VLLMInstanceLauncher(
        cluster,
        max_instances=high,
        health_timeout_s=float(section.get("health_timeout_s", 240.0)),
        log_dir=section.get("log_dir"),
    )


def vllm_pool_bounds(cluster: Mapping[str, Any]) -> tuple[int, int]:
    """``min_count``, ``max_count`` of the cluster's (one) group, each defaulting to
    ``vllm.num_instances``, which must lie between them."""
    start = int(cluster["vllm"].get("num_instances", 1))
    group = (cluster.get("groups") or [{}])[0]
    low, high = int(group.get("min_count", start)), int(group.get("max_count", start))
    if not low <= start <= high:
        raise ValueError(
            f"cluster.vllm.num_instances={start} must lie within the group's "
            f"min_count={low} and max_count={high}"
        )
    return low, high


def pool_autoscaling(
    manager: ControlPlaneManager,
    node: DictConfig,
    cluster: Mapping[str, Any],
    pd_on: bool,
    instances: list[ExecutionInstance],
    launcher: Any = None,
    drain_timeout_s: float = 600.0,
) -> Any:
    """An autoscaler (``node``, one per pool) sizing the pools of the gateway: over launched
    vLLM servers (``launcher``), their one pool; over simulated replicas, one pool per
    cluster group between its ``min_count`` and ``max_count``, each new replica like the
    group's first, serving ``cluster.cold_start_s`` simulated seconds after it is asked for
    (as in a simulation run)."""
    from backends.live_autoscale import LiveAutoscaler, PoolAutoscaling, SimInstanceLauncher
    from backends.sim.live import SimBackend

    if launcher is not None:
        low, high = vllm_pool_bounds(cluster)
        scaler = LiveAutoscaler(manager, instantiate(node), launcher, low, high,
                                pool=str(cluster["vllm"].get("name_prefix", "engine")),
                                drain_timeout_s=drain_timeout_s)  # fmt: skip
        return PoolAutoscaling([(scaler, [i.instance_id for i in instances])])
    if not isinstance(manager.backend, SimBackend):
        raise ValueError(
            "autoscaling= needs engines cpsim starts (a cluster with `vllm:`) or backend=sim; "
            "engines named by `endpoints:` are scaled by whoever runs them"
        )
    key = "pd_groups" if pd_on else "groups"
    cold_start_s = float(cluster.get("cold_start_s", 60.0)) / manager.backend.time_scale
    pools = []
    for group in cluster[key]:
        name = group["name"]
        members = [i for i in instances if i.metadata.get("pool") == name]  # count >= 1
        count = len(members)
        scaler = LiveAutoscaler(
            manager,
            instantiate(node),
            SimInstanceLauncher(members[0], cold_start_s=cold_start_s, prefix=name),
            min_instances=int(group.get("min_count", count)),
            max_instances=int(group.get("max_count", count)),
            pool=name,
            drain_timeout_s=drain_timeout_s,
        )
        pools.append((scaler, [i.instance_id for i in members]))
    return PoolAutoscaling(pools)


def engine_supervisor(manager: ControlPlaneManager, policy: Any, engines: list[Any]) -> Any:
    """Restarts the engines cpsim runs when they die: the launcher's servers, or the
    simulated replicas (engines already running elsewhere are not cpsim's to restart)."""
    from backends.live_restart import EngineSupervisor, SimEngine
    from backends.sim.live import SimBackend

    if isinstance(manager.backend, SimBackend):
        ids = [i.instance_id for i in manager.get_instances()]
        return EngineSupervisor(manager, policy, {iid: SimEngine(manager, iid) for iid in ids})
    if not engines:
        raise ValueError(
            "restart= needs engines cpsim starts (a cluster with `vllm:`) or backend=sim; "
            "engines named by `endpoints:` are restarted by whoever runs them"
        )
    return EngineSupervisor(manager, policy, {e.instance.instance_id: e for e in engines})


def serve(cfg: DictConfig, choices: Mapping[str, Any]) -> None:
    import uvicorn

    from cpsim.serve.app import create_app

    gateway, engines = build_gateway(cfg, choices)
    settings = gateway.settings

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # new requests get 503; in-flight ones have shutdown_grace_s, then are cancelled
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(gateway.begin_shutdown)
            super().handle_exit(sig, frame)

    def exit_cleanly(sig: int, frame: Any) -> None:
        # uvicorn raises the signal it stopped for once it has shut down: exit through
        # Python, so that `finally` stops the engines the launcher started
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, exit_cleanly)
    def freeze_start_up_objects() -> None:
        # The ~100k objects of the imports and the start-up never become garbage; frozen,
        # a full collection under load no longer walks them (35 ms of stalled event loop
        # each time, every few seconds: the latency spikes at p99)
        gc.collect()
        gc.freeze()
        # By default a collection is due every 700 net allocations: at 500 req/s about 60 a
        # second, every tenth walking all in-flight requests' objects (1-6 ms of stalled
        # loop), longer as a backlog grows, so a loaded gateway fell further behind. Under
        # load it makes no cyclic garbage (none in 1 s samples); this still bounds any.
        gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)

    config = uvicorn.Config(
        create_app(gateway, on_started=freeze_start_up_objects),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # the gateway cancels what is left at the grace's end; a moment to send the news
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + 2,
    )
    try:
        Server(config).run()
    finally:
        if engines:
            from backends.vllm.launcher import stop

            stop(engines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve/config")
def main(cfg: DictConfig) -> None:
    serve(cfg, HydraConfig.get().runtime.choices)


if __name__ == "__main__":
    main()
