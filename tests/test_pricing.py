"""Each instance is priced by a latency model measured for it: its group's profile, the run's
where it fits, a shipped profile of its model, GPU, TP and PP, or the roofline, said so."""

from __future__ import annotations

import pytest

from cpsim.instances import InstanceState
from cpsim.pricing import InstanceLatencyModels, latency_for, misfit
from cpsim.profiles import ProfiledLatencyModel, load_profile
from cpsim.roofline import RooflineLatencyModel
from cpsim.types import ExecutionInstance, RequestMetadata
from cpsim.views import RequestView
from experiments.api import simulate

TP1 = "vllm-opt-13b-a100-80gb-tp1"


def opt13b(tp: int = 1, gpu: str = "A100-80GB", pp: int = 1) -> ExecutionInstance:
    return ExecutionInstance(
        f"opt-tp{tp}", model_name="opt-13b", gpu_type=gpu, tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
    )


@pytest.mark.parametrize(
    ("profile", "instance", "wrong"),
    [
        (TP1, opt13b(), None),
        ("vllm-opt-13b-a100-80gb-tp4", opt13b(4), None),
        (TP1, opt13b(2), "TP 1, not 2"),
        (TP1, opt13b(gpu="H100-SXM"), "GPU 'A100-80GB', not 'H100-SXM'"),
        (TP1, opt13b(pp=2), "PP 1, not 2"),
        ("vllm-opt-66b-a100-80gb-tp2", opt13b(2), "model 'facebook/opt-66b', not 'opt-13b'"),
        # a CPU profile prices the placeholder GPU of a CPU cluster
        ("vllm-cpu-tiny-llama-tp1", ExecutionInstance("c", model_name="tiny-llama",
                                                      gpu_type="L4"), None),
    ],
)
def test_misfit_names_what_a_profile_was_measured_for(
    profile: str, instance: ExecutionInstance, wrong: str | None
) -> None:
    assert misfit(load_profile(profile), instance) == wrong


def test_latency_for_picks_the_groups_then_the_runs_then_a_shipped_profile_then_roofline() -> None:
    run = load_profile(TP1)
    model, why = latency_for(opt13b(), run_profile=run)
    assert model is run and why == "the run's profile"
    model, why = latency_for(opt13b(4), run_profile=run)
    assert isinstance(model, ProfiledLatencyModel) and model.tensor_parallel_size == 4
    assert why == "profile vllm-opt-13b-a100-80gb-tp4 (measured for its model, GPU, TP and PP)"
    model, why = latency_for(opt13b(3), run_profile=run)
    assert isinstance(model, RooflineLatencyModel)
    assert why == (
        "roofline (the run's profile was measured for TP 1, not 3, and no profile is measured "
        "for its model, GPU, TP and PP; calibration vllm-a100-80gb)"
    )
    model, why = latency_for(opt13b(2), "vllm-opt-13b-a100-80gb-tp2", run)
    assert model.tensor_parallel_size == 2 and why.endswith("(its group's)")
    with pytest.raises(ValueError, match=r"profile '.*tp4' cannot price instance 'opt-tp2': "
                                         r"it was measured for TP 4, not 2"):
        latency_for(opt13b(2), "vllm-opt-13b-a100-80gb-tp4", run)


def test_a_group_may_choose_the_roofline_where_a_profile_exists() -> None:
    # to check the analytical model against a profile, or a replay priced by each
    run = load_profile(TP1)
    model, why = latency_for(opt13b(), "roofline", run)
    assert isinstance(model, RooflineLatencyModel) and model.tensor_parallel_size == 1
    assert why == "roofline (its group's; calibration vllm-a100-80gb)"


def test_another_engines_profile_prices_an_instance_only_where_its_group_names_it() -> None:
    # DistServe's engine and vLLM 0.2.3 on Ray are profiled for OPT-13B at TP1 and TP2 too
    for tp in (1, 2):
        model, why = latency_for(opt13b(tp))
        assert isinstance(model, ProfiledLatencyModel) and model.engine == "vllm"
        assert why.startswith(f"profile vllm-opt-13b-a100-80gb-tp{tp} ")
    named, why = latency_for(opt13b(2), "distserve-opt-13b-a100-80gb-tp2")
    assert isinstance(named, ProfiledLatencyModel) and named.engine == "distserve"


def test_predictions_use_each_instances_own_model() -> None:
    tp1, tp4 = load_profile(TP1), load_profile("vllm-opt-13b-a100-80gb-tp4")
    models = InstanceLatencyModels({"a": tp1, "b": tp4}, default=tp1)
    request = RequestView.of(RequestMetadata("r", num_prompt_tokens=1500, max_tokens=100), 0.0, 0)
    views = {}
    for iid, tp in (("a", 1), ("b", 4)):
        inst = ExecutionInstance(iid, model_name="opt-13b", tensor_parallel_size=tp)
        views[iid] = InstanceState(inst, 0.0).view()
    assert models.predict(request, views["a"]) == tp1.predict(request, views["a"])
    assert models.predict(request, views["b"]) == tp4.predict(request, views["b"])


def _group(tp: int, **extra: object) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in extra.items())
    more = f", {fields}" if fields else ""
    return (f"cluster.groups=[{{name: g, count: 1, instance_type: general, "
            f"tensor_parallel_size: {tp}, cost_per_gpu_hour: 1.0{more}}}]")


def test_a_tp4_replica_runs_faster_than_a_tp1_replica_where_the_profiles_say_so() -> None:
    runs = {tp: simulate("workload=tiny", "cluster=small", _group(tp)) for tp in (1, 4)}
    assert runs[1].info["latency_models"] == {"g-0": "the run's profile"}
    assert runs[4].info["latency_models"] == {
        "g-0": "profile vllm-opt-13b-a100-80gb-tp4 (measured for its model, GPU, TP and PP)"
    }
    for metric in ("p50_ttft_ms", "p50_tpot_ms"):
        assert getattr(runs[4].metrics, metric) < getattr(runs[1].metrics, metric)
    with pytest.raises(ValueError, match="cannot price instance 'g-0'"):
        simulate("workload=tiny", "cluster=small", _group(1, profile="vllm-opt-13b-a100-80gb-tp4"))


def test_the_live_simulated_backend_prices_instances_the_same_way() -> None:
    from backends.sim.live import SimBackend
    from cpsim.models import load_model_spec

    spec = load_model_spec("opt-13b")
    latency = SimBackend._latency_of(opt13b(4), spec)
    assert isinstance(latency, ProfiledLatencyModel) and latency.tensor_parallel_size == 4
    unknown = ExecutionInstance("u", model_name="my-model", gpu_type="A100-80GB")
    fallback = SimBackend._latency_of(unknown, load_model_spec("llama-3-8b"))
    assert isinstance(fallback, RooflineLatencyModel)  # the backend's default model
    wrong = opt13b(2)
    wrong.metadata["profile"] = TP1
    with pytest.raises(ValueError, match="measured for TP 1, not 2"):
        SimBackend._latency_of(wrong, spec)


def test_a_run_without_a_profile_prices_each_instance_by_its_own_model() -> None:
    # a model no shipped profile is measured for: `~profile` (profile: null) runs it
    result = simulate("cluster=llm_k8s_llama33_70b", "~profile", "workload=tiny")
    assert (result.requests["status"] == "COMPLETED").all()
    assert result.info["latency_models"] == {
        "tp8-0": "roofline (its group's; calibration vllm-0.8-a100)"
    }
    with pytest.raises(ValueError, match="or none"):
        simulate("cluster=llm_k8s_llama33_70b", "workload=tiny")
