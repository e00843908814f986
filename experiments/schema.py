"""Structured-config schemas: typos in the top-level run settings fail at compose time."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore

from cpsim.outliers import OutlierConfig


def _schema_of(cls: type) -> Any:
    """A structured-config twin of the dataclass ``cls`` (same fields, types and defaults),
    so the schema cannot drift from the class it configures."""
    hints = get_type_hints(cls)
    return make_dataclass(
        f"{cls.__name__}Schema",
        [(f.name, hints[f.name], field(default=f.default)) for f in fields(cls)],
    )


OutlierSchema = _schema_of(OutlierConfig)


@dataclass
class CoreSchema:
    max_queue_len: int | None = None
    on_instance_failure: str = "requeue"
    max_attempts: int = 3
    queue_timeout_s: float | None = None
    retry_budget_frac: float = 0.2
    min_retry_concurrency: int = 3
    outliers: OutlierSchema = field(default_factory=OutlierSchema)


@dataclass
class KVLinkSchema:
    bandwidth_gbps: float = 100.0
    latency_ms: float = 1.0


@dataclass
class RunSchema:
    """Top-level keys of conf/config.yaml. Group options (policy, router, ...) stay free-form
    because each one's keys are its constructor's arguments."""

    seed: int = 0
    scrape_interval_s: float = 0.5
    drain_timeout_s: float = 3600.0
    progress: bool | None = None
    core: CoreSchema = field(default_factory=CoreSchema)
    kv_link: KVLinkSchema = field(default_factory=KVLinkSchema)
    policy: Any = None
    router: Any = None
    pd: Any = None
    cluster: Any = None
    workload: Any = None
    profile: Any = None
    study: Any = None
    backend: Any = None
    parallelism: Any = None
    faults: list[Any] = field(default_factory=list)


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunSchema)
