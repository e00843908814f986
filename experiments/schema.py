"""Structured-config schemas: typos in the top-level run settings fail at compose time."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore

from cpsim.outliers import OutlierConfig
from cpsim.serve.limits import Limit


def _schema_of(cls: type, types: dict[str, Any] | None = None) -> Any:
    """A structured-config twin of the dataclass ``cls`` (same fields, types and defaults),
    so the schema cannot drift from the class it configures. ``types``: fields whose
    schema is another one (a nested section)."""
    hints = {**get_type_hints(cls), **(types or {})}

    def default(f: Any) -> Any:
        if f.name in (types or {}):
            return field(default_factory=hints[f.name])
        if f.default is MISSING and f.default_factory is not MISSING:
            return field(default_factory=f.default_factory)
        return field(default=f.default)

    return make_dataclass(
        f"{cls.__name__}Schema", [(f.name, hints[f.name], default(f)) for f in fields(cls)]
    )


OutlierSchema = _schema_of(OutlierConfig)
LimitSchema = _schema_of(Limit)


@dataclass
class CoreSchema:
    max_queue_len: int | None = None
    on_instance_failure: str = "requeue"
    max_attempts: int = 3
    queue_timeout_s: float | None = None
    retry_budget_frac: float = 0.2
    min_retry_concurrency: int = 3
    outliers: OutlierSchema = field(default_factory=OutlierSchema)
    max_records: int | None = None


@dataclass
class MetricsSchema:
    ttft_at: str = "client"


@dataclass
class KVLinkSchema:
    bandwidth_gbps: float = 100.0
    latency_ms: float = 1.0


@dataclass
class ObjectiveSchema:
    """What a ``-m`` job returns to a sweeper (experiments.run.objective_value); without one,
    its goodput."""

    slo: dict[str, float] = field(default_factory=dict)  # summary column -> most allowed
    penalty_usd_per_hour: float = 1000.0


@dataclass
class RunSchema:
    """Top-level keys of conf/config.yaml. Group options (policy, router, ...) stay free-form
    because each one's keys are its constructor's arguments."""

    seed: int = 0
    scrape_interval_s: float = 0.5
    drain_timeout_s: float = 3600.0
    progress: bool | None = None
    core: CoreSchema = field(default_factory=CoreSchema)
    metrics: MetricsSchema = field(default_factory=MetricsSchema)
    kv_link: KVLinkSchema = field(default_factory=KVLinkSchema)
    migration_mechanism: str = "kv_copy"
    policy: Any = None
    router: Any = None
    pd: Any = None
    cluster: Any = None
    workload: Any = None
    profile: Any = None
    study: Any = None
    backend: Any = None
    parallelism: Any = None
    search: Any = None
    quotas: Any = None
    autoscaling: Any = None
    migration: Any = None
    restart: Any = None
    links: Any = None
    objective: ObjectiveSchema | None = None
    faults: list[Any] = field(default_factory=list)


def _server_schema() -> Any:
    from cpsim.serve.app import ServerSettings  # needs the serve extra: only `cpsim serve` does

    return _schema_of(ServerSettings, {"per_key": LimitSchema, "per_user": LimitSchema})


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunSchema)


def register_serve() -> None:
    """The schema of conf/serve/config.yaml (its ``server:`` from ServerSettings)."""

    @dataclass
    class ServeSchema:
        core: CoreSchema = field(default_factory=CoreSchema)
        server: Any = field(default_factory=_server_schema())
        policy: Any = None
        router: Any = None
        pd: Any = None
        cluster: Any = None
        profile: Any = None
        backend: Any = None
        quotas: Any = None
        links: Any = None
        restart: Any = None
        autoscaling: Any = None
        migration: Any = None

    ConfigStore.instance().store(name="serve_schema", node=ServeSchema)
