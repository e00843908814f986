"""cpsim: a simulation-first framework for LLM-serving control planes."""

from typing import TYPE_CHECKING

from cpsim.compiled import use_source_if_stale

use_source_if_stale()  # before any compiled module loads: an edited build runs from source

from cpsim.core import Abort, Admission, ControlPlane, ControlPlaneConfig, Dispatch
from cpsim.latency import LatencyEstimate, LatencyModel, ObservedLatencyModel, StepBatch
from cpsim.metrics import MetricsCollector
from cpsim.models import ModelSpec, load_model_spec
from cpsim.protocols import PDPolicy, Placement, Router, SchedulingPolicy
from cpsim.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    ParallelismType,
    PDSeparationConfig,
    PerformanceMetrics,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
    RequestStatus,
)
from cpsim.views import InstanceSnapshot, InstanceView, Phase, RequestView

if TYPE_CHECKING:
    from cpsim.manager import ControlPlaneManager


def __getattr__(name: str) -> object:
    """``from cpsim import ControlPlaneManager`` as in the seed, imported on first use: the
    manager brings in the policies and the default backend, which ``import cpsim`` does not."""
    if name == "ControlPlaneManager":
        from cpsim.manager import ControlPlaneManager

        return ControlPlaneManager
    raise AttributeError(f"module 'cpsim' has no attribute {name!r}")


__all__ = [
    "Abort",
    "Admission",
    "ControlPlane",
    "ControlPlaneConfig",
    "ControlPlaneManager",
    "DecodingConfig",
    "Dispatch",
    "ExecutionInstance",
    "ExecutionInstanceType",
    "InstanceSnapshot",
    "InstanceView",
    "LatencyEstimate",
    "LatencyModel",
    "MetricsCollector",
    "ModelSpec",
    "ObservedLatencyModel",
    "PDPolicy",
    "PDSeparationConfig",
    "ParallelismType",
    "PerformanceMetrics",
    "Phase",
    "Placement",
    "PrefillingConfig",
    "RequestMetadata",
    "RequestPriority",
    "RequestStatus",
    "RequestView",
    "Router",
    "SchedulingPolicy",
    "StepBatch",
    "load_model_spec",
]
