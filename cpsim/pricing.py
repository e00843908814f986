"""Which latency model prices each instance, and predictions with each instance's own.

An instance is priced by the profile its group names (an error if that profile was measured
for another model, GPU, TP or PP; ``roofline`` names the analytical model), else by the run's
profile where it fits, else by a shipped profile measured for its model, GPU, TP and PP
(``conf/profile/``), else by the analytical roofline; ``latency_for`` says which and why, so
a run can report it. ``InstanceLatencyModels`` lets a policy or the core predict a request on
each instance with that instance's model.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

from cpsim.datafiles import PROFILE_DIR, data_names
from cpsim.models import ModelSpec, load_model_spec
from cpsim.profiles import ProfiledLatencyModel, available_profiles, load_profile
from cpsim.protocols import LatencyEstimate, LatencyModel
from cpsim.roofline import RooflineLatencyModel
from cpsim.types import ExecutionInstance
from cpsim.views import InstanceView, RequestView

ROOFLINE = "roofline"  # a group's ``profile: roofline``: the analytical model, by choice


@cache
def _gpu_names() -> frozenset[str]:
    return frozenset(name.lower() for name in data_names("gpus"))


def _model_names(model_name: str) -> set[str]:
    names = {model_name}
    if model_name in data_names("models"):
        names.add(load_model_spec(model_name).name)
    return names


def misfit(profile: ProfiledLatencyModel, instance: ExecutionInstance) -> str | None:
    """Why ``profile`` cannot price ``instance`` (None: it can). The hardware is compared
    where the profile names a GPU cpsim knows: a CPU profile prices the placeholder GPU of a
    CPU cluster."""
    wrong = []
    if profile.model not in _model_names(instance.model_name):
        wrong.append(f"model {profile.model!r}, not {instance.model_name!r}")
    hardware = profile.hardware.strip().lower()
    if hardware in _gpu_names() and hardware != instance.gpu_type.strip().lower():
        wrong.append(f"GPU {profile.hardware!r}, not {instance.gpu_type!r}")
    if profile.tensor_parallel_size != instance.tensor_parallel_size:
        wrong.append(f"TP {profile.tensor_parallel_size}, not {instance.tensor_parallel_size}")
    if profile.pipeline_parallel_size != instance.pipeline_parallel_size:
        wrong.append(f"PP {profile.pipeline_parallel_size}, not {instance.pipeline_parallel_size}")
    return "; ".join(wrong) or None


@cache
def _shipped(directory: Path) -> tuple[tuple[str, ProfiledLatencyModel], ...]:
    return tuple((name, load_profile(name, directory)) for name in available_profiles(directory))


def find_profile(
    instance: ExecutionInstance, directory: Path = PROFILE_DIR
) -> tuple[str, ProfiledLatencyModel] | None:
    """A profile in ``directory`` measured with today's vLLM (an instance is such an engine;
    other engines' and old versions' profiles are used only where named) on the instance's
    GPU for its model, TP and PP."""
    for name, profile in _shipped(directory):
        on_gpu = profile.hardware.strip().lower() in _gpu_names()
        is_vllm = profile.engine.strip().lower() in ("vllm", "vllm-cpu")
        if on_gpu and is_vllm and misfit(profile, instance) is None:
            return name, profile
    return None


def latency_for(
    instance: ExecutionInstance,
    profile_name: str | None = None,
    run_profile: ProfiledLatencyModel | None = None,
    model_spec: ModelSpec | None = None,
) -> tuple[ProfiledLatencyModel | RooflineLatencyModel, str]:
    """The model that prices ``instance`` and a line saying which it is and why.
    ``profile_name``: the profile its group names (it must fit; ``roofline``: the analytical
    model even where a profile exists, to check one against the other); ``run_profile``: the run's
    ``profile=``, used where it fits; ``model_spec``: what the roofline prices (default:
    the instance's model)."""
    if profile_name == ROOFLINE:
        roofline = _roofline(instance, model_spec)
        return roofline, f"roofline (its group's; {roofline.calibration_note})"
    if profile_name is not None:
        profile = load_profile(profile_name)
        wrong = misfit(profile, instance)
        if wrong is not None:
            raise ValueError(
                f"profile {profile_name!r} cannot price instance {instance.instance_id!r}: "
                f"it was measured for {wrong}; choose one of the instance's model, GPU, TP "
                "and PP, or leave the group's profile out"
            )
        return profile, f"profile {profile_name} (its group's)"
    if run_profile is not None:
        wrong = misfit(run_profile, instance)
        if wrong is None:
            return run_profile, "the run's profile"
    found = find_profile(instance)
    if found is not None:
        return found[1], f"profile {found[0]} (measured for its model, GPU, TP and PP)"
    roofline = _roofline(instance, model_spec)
    why = "no profile is measured for its model, GPU, TP and PP"
    if run_profile is not None:
        why = f"the run's profile was measured for {misfit(run_profile, instance)}, and {why}"
    return roofline, f"roofline ({why}; {roofline.calibration_note})"


def _roofline(instance: ExecutionInstance, model_spec: ModelSpec | None) -> RooflineLatencyModel:
    return RooflineLatencyModel(
        model_spec or instance.model_name,
        instance.gpu_type,
        instance.tensor_parallel_size,
        instance.pipeline_parallel_size,
        gpus_per_node=instance.gpus_per_node,
        expert_parallel_size=instance.expert_parallel_size,
        calibration=instance.metadata.get("calibration"),
    )


class InstanceLatencyModels:
    """Predicts a request on an instance with that instance's own model (``models`` by
    instance id; ``default`` for an instance not in it)."""

    def __init__(self, models: Mapping[str, LatencyModel], default: LatencyModel) -> None:
        self.models = dict(models)
        self.default = default

    def predict(self, request: RequestView, instance: InstanceView) -> LatencyEstimate:
        model = self.models.get(instance.instance_id, self.default)
        return model.predict(request, instance)
