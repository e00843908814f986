"""Latency models: profile files, published mapping, roofline, GPU specs, KV capacity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backends.sim.kv_capacity import num_kv_blocks
from cpsim.gpus import available_gpus, load_gpu_spec
from cpsim.latency import StepBatch, StepLatencyModel
from cpsim.models import load_model_spec
from cpsim.parallelism import expert_param_count
from cpsim.pricing import latency_for
from cpsim.profiles import (
    PROFILE_DIR,
    ProfiledLatencyModel,
    available_profiles,
    load_profile,
    save_profile,
)
from cpsim.protocols import LatencyModel
from cpsim.roofline import RooflineLatencyModel
from cpsim.types import ExecutionInstance, ExecutionInstanceType, RequestMetadata
from cpsim.views import InstanceView, RequestView

PUBLISHED = Path("/work/shared/published_profiles/profiler-a100-80g.vllm.json")


def instance_view(num_running: int = 0, pending: int = 0) -> InstanceView:
    return InstanceView(
        "i0",
        "m",
        ExecutionInstanceType.GENERAL,
        True,
        num_running,
        pending,
        256,
        num_running,
        0,
        0.1,
        1,
        1,
        1,
        1,
        1,
        "A100-80GB",
        80.0,
        2.0,
        None,
        None,
    )


def request_view(prompt: int = 1000, max_tokens: int = 200) -> RequestView:
    meta = RequestMetadata("q", num_prompt_tokens=prompt, max_tokens=max_tokens)
    return RequestView.of(meta, 0.0, 0)


@pytest.mark.parametrize("name", available_profiles())
def test_every_profile_file_loads_and_prices_a_batch(name: str) -> None:
    model = load_profile(name)
    assert isinstance(model, StepLatencyModel) and isinstance(model, LatencyModel)
    assert model.provenance.get("source")
    prefill = model.step_time_s(StepBatch(1000, 1000**2, 0, 1))
    decode = model.step_time_s(StepBatch(num_decode_seqs=32, decode_context_tokens=32 * 1000))
    assert 0.001 < decode < prefill < 5.0
    estimate = model.predict(request_view(), instance_view(num_running=8, pending=2000))
    assert estimate.ttft_s > prefill and estimate.tpot_s > 0


def test_profiles_cover_the_published_configurations() -> None:
    names = set(available_profiles())
    for model, tps in (("opt-13b", (1, 2, 4)), ("opt-66b", (2, 4))):
        for tp in tps:
            assert f"vllm-{model}-a100-80gb-tp{tp}" in names


@pytest.mark.skipif(not PUBLISHED.exists(), reason="published profiles not mounted")
@pytest.mark.parametrize(
    ("model", "tp", "prompts", "num_seqs", "context"),
    [
        ("facebook/opt-13b", "1", (512,), 0, 0),
        ("facebook/opt-13b", "2", (100, 900, 2048), 0, 0),
        ("facebook/opt-66b", "4", (1500,), 0, 0),
        ("facebook/opt-13b", "1", (), 8, 8 * 700),
        ("facebook/opt-13b", "4", (), 94, 94 * 1500),
        ("facebook/opt-13b", "4", (), 95, 95 * 1500),
        ("facebook/opt-66b", "2", (), 200, 200 * 1200),
    ],
)
def test_published_mapping_reproduces_the_published_formula(  # type: ignore[no-untyped-def]
    model, tp, prompts, num_seqs, context
) -> None:
    raw = json.loads(PUBLISHED.read_text())[model][tp]
    short = model.split("/")[1]
    profile = load_profile(f"vllm-{short}-a100-80gb-tp{tp}")
    if prompts:
        a, b, c = raw["prefill"]
        expected_ms = a + b * sum(prompts) + c * sum(p * p for p in prompts)
        batch = StepBatch(sum(prompts), sum(p * p for p in prompts), 0, len(prompts))
    else:
        key = (
            "decoding_smallbs"
            if num_seqs < raw["decoding_large_small_bs_threshold"]
            else ("decoding_largebs")
        )
        a, b, c = raw[key]
        expected_ms = a + b * context + c * num_seqs
        batch = StepBatch(num_decode_seqs=num_seqs, decode_context_tokens=context)
    assert profile.step_time_s(batch) * 1000 == pytest.approx(expected_ms, rel=1e-9)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = load_profile("vllm-opt-13b-a100-80gb-tp2")
    path = save_profile(model, tmp_path / "copy.yaml")
    again = load_profile(path)
    assert again.to_dict() == model.to_dict()
    batch = StepBatch(300, 90_000, 10, 1, 40, 40_000)
    assert again.step_time_s(batch) == model.step_time_s(batch)


def test_profile_file_is_a_hydra_instantiable_config() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(PROFILE_DIR / "vllm-opt-66b-a100-80gb-tp4.yaml")
    model = instantiate(cfg)
    assert isinstance(model, ProfiledLatencyModel) and model.tensor_parallel_size == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coefficients": {"bogus_s": 1.0}}, "unknown terms"),
        ({"coefficients": {}, "tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"coefficients": {}, "large_batch_min_decode_seqs": 4}, "go together"),
    ],
)
def test_bad_profile_arguments_name_the_field(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        ProfiledLatencyModel("m", "g", **kwargs)


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="vllm-opt-13b-a100-80gb-tp1"):
        load_profile("no-such-profile")


@pytest.mark.parametrize(
    ("profile", "seqs", "context", "steps"),
    [("vllm-opt-13b-a100-80gb-tp1", 10, 5000, 5), ("vllm-cpu-tiny-llama-tp1", 5, 4000, 3)],
)
def test_linear_decode_form_matches_per_step_prices(
    profile: str, seqs: int, context: int, steps: int
) -> None:
    # The measured CPU profile has serving terms the published ones price at 0.
    model = load_profile(profile)
    first, increment = model.decode_step_linear_s(seqs, context, seqs)  # type: ignore[misc]
    for i in range(steps):
        batch = StepBatch(num_decode_seqs=seqs, decode_context_tokens=context + seqs * i)
        assert first + increment * i == pytest.approx(model.step_time_s(batch), rel=1e-12)
    contexts = np.array([100, 200, 300])
    assert model.decode_step_times_s(seqs, contexts).tolist() == pytest.approx(
        [
            model.step_time_s(StepBatch(num_decode_seqs=seqs, decode_context_tokens=c))
            for c in (100, 200, 300)
        ]
    )


def test_prediction_grows_with_queued_prefill_and_running_batch() -> None:
    model = load_profile("vllm-opt-13b-a100-80gb-tp1")
    idle = model.predict(request_view(), instance_view())
    busy = model.predict(request_view(), instance_view(num_running=50, pending=5000))
    assert busy.ttft_s > idle.ttft_s and busy.tpot_s > idle.tpot_s
    assert idle.ttft_s == pytest.approx(model.step_time_s(StepBatch(1000, 1000**2, 0, 1)))


# ---------------------------------------------------------------------- roofline
def test_roofline_decode_is_memory_bound_and_big_prefill_compute_bound() -> None:
    model = RooflineLatencyModel("llama-3-8b", "A100-80GB")
    decode = StepBatch(num_decode_seqs=32, decode_context_tokens=32 * 1000)
    prefill = StepBatch(8192, 8192**2, 0, 1)
    assert model.stage_cost(decode).is_memory_bound
    assert not model.stage_cost(prefill).is_memory_bound
    # memory-bound decode: about the weights' read time (16 GB at ~1.6 TB/s), not per-token
    assert 0.008 < model.step_time_s(decode) < 0.03
    assert model.step_time_s(prefill) > 10 * model.step_time_s(decode)
    assert isinstance(model, StepLatencyModel) and isinstance(model, LatencyModel)


def test_roofline_tp_splits_work_and_adds_all_reduces() -> None:
    prefill = StepBatch(4096, 4096**2, 0, 1)
    tp1 = RooflineLatencyModel("llama-3-8b", "H100-SXM")
    tp2 = RooflineLatencyModel("llama-3-8b", "H100-SXM", tensor_parallel_size=2)
    assert tp2.stage_cost(prefill).comm_s > 0 == tp1.stage_cost(prefill).comm_s
    assert tp2.step_time_s(prefill) < tp1.step_time_s(prefill)


def test_roofline_pipeline_is_stage_pipelined() -> None:
    pp1 = RooflineLatencyModel("llama-3-8b", "A100-80GB")
    pp2 = RooflineLatencyModel("llama-3-8b", "A100-80GB", pipeline_parallel_size=2)
    intra = pp2.send_recv["intra_node"]  # both stages on one node: measured NVLink send/recv
    assert intra == pp2.calibration.send_recv["intra_node"] and pp2.inter_node_handoffs == 0
    lone = StepBatch(2000, 2000**2, 0, 1)
    # one sequence cannot be split: it crosses both stages, the whole model's work, in sequence
    handoff = intra.time_s(2000 * 4096 * 2)
    assert pp2.step_time_s(lone) == pytest.approx(pp1.step_time_s(lone) + handoff, rel=1e-9)
    # many sequences: two micro-batches, each stage-time a half batch on half the layers
    batch = StepBatch(num_decode_seqs=64, decode_context_tokens=64 * 1000)
    stage = pp2.stage_cost(batch, 2)
    fixed = pp2.calibration.decode_step_s + 64 * pp2.calibration.seq_s  # once per step
    expected = fixed + 2 * stage.time_s + intra.time_s(32 * 4096 * 2)
    assert pp2.step_time_s(batch) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("tp", "pp", "gpus_per_node", "inter"),
    [(4, 2, 8, 0), (4, 2, 4, 1), (2, 4, 4, 1), (1, 8, 8, 0), (8, 2, 8, 1), (2, 4, 2, 3)],
)
def test_roofline_counts_the_handoffs_that_cross_nodes(
    tp: int, pp: int, gpus_per_node: int, inter: int
) -> None:
    model = RooflineLatencyModel("llama-3-70b", "A100-80GB", tp, pp, gpus_per_node=gpus_per_node)
    assert model.inter_node_handoffs == inter


def test_roofline_prices_a_cross_node_handoff_at_the_network() -> None:
    batch = StepBatch(2048, 2048**2, 0, 1)
    one_node = RooflineLatencyModel("llama-3-70b", "A100-80GB", 4, 2)
    two_nodes = RooflineLatencyModel("llama-3-70b", "A100-80GB", 4, 2, gpus_per_node=4)
    sent = 2048 * 8192 * 2
    measured = two_nodes.calibration.send_recv
    assert measured["inter_node"].bytes_per_s < measured["intra_node"].bytes_per_s / 10
    extra = measured["inter_node"].time_s(sent) - measured["intra_node"].time_s(sent)
    assert two_nodes.step_time_s(batch) - one_node.step_time_s(batch) == pytest.approx(extra)
    # a GPU with no calibration: its datasheet link within a node, a 200 Gb/s NIC across
    l4 = RooflineLatencyModel("llama-3-8b", "L4", 1, 2, gpus_per_node=1)
    assert l4.send_recv["inter_node"].bytes_per_s == 25e9 and l4.inter_node_handoffs == 1


def test_roofline_and_instances_reject_a_bad_gpus_per_node() -> None:
    with pytest.raises(ValueError, match="gpus_per_node"):
        RooflineLatencyModel("llama-3-8b", "A100-80GB", gpus_per_node=0)
    with pytest.raises(ValueError, match="gpus_per_node"):
        ExecutionInstance("i", metadata={"gpus_per_node": 2.5})
    assert ExecutionInstance("i", metadata={"gpus_per_node": 4}).gpus_per_node == 4
    assert ExecutionInstance("i").gpus_per_node == 8


def test_roofline_moe_step_reads_only_the_experts_its_tokens_reach() -> None:
    model = RooflineLatencyModel("mixtral-8x7b", "H100-SXM", tensor_parallel_size=2)
    spec = model.model  # 8 experts, 2 per token
    assert model.reached(1) == pytest.approx(0.25)
    assert model.reached(8) == pytest.approx(1 - 0.75**8) and model.reached(1000) > 0.999
    experts = expert_param_count(spec) * spec.bytes_per_param
    one = model.stage_cost(StepBatch(num_decode_seqs=1, decode_context_tokens=100))
    read = (spec.weight_bytes - experts + 0.25 * experts) / 2  # per GPU of TP2
    assert one.memory_s == pytest.approx(read / model._bytes_s)
    steps = [
        model.step_time_s(StepBatch(num_decode_seqs=n, decode_context_tokens=n * 100))
        for n in (1, 2, 4, 8, 16)
    ]
    assert steps == sorted(steps) and steps[-1] > 1.5 * steps[0]
    dense = RooflineLatencyModel("llama-3-8b", "H100-SXM")
    assert dense.reached(1) == 1.0


def test_roofline_ep_beyond_the_tp_group_dispatches_and_combines() -> None:
    batch = StepBatch(num_decode_seqs=64, decode_context_tokens=64 * 1000)
    in_tp = RooflineLatencyModel("mixtral-8x7b", "H100-SXM", 8, expert_parallel_size=8)
    tp8 = RooflineLatencyModel("mixtral-8x7b", "H100-SXM", 8)
    # experts inside the TP group: the same all-reduces and bytes as sharding them by TP
    assert not in_tp.dispatches
    assert in_tp.step_time_s(batch) == pytest.approx(tp8.step_time_s(batch))
    wide = RooflineLatencyModel("mixtral-8x7b", "H100-SXM", 1, expert_parallel_size=8)
    assert wide.dispatches and wide.all_to_all == wide.calibration.all_to_all_at(8)
    sent = 64 * 2 * 4096 * 2  # 64 tokens to 2 experts each, bf16
    cost = wide.stage_cost(batch)
    assert cost.comm_s == pytest.approx(2 * 32 * wide.all_to_all.time_s(sent))
    # its experts see the tokens of all 8 DP ranks: every expert is reached
    assert wide.stage_cost(StepBatch(num_decode_seqs=1)).memory_s > one_rank_reads(wide)
    # no all-to-all measured on A100: its NVLink within a node, a NIC beyond
    a100 = RooflineLatencyModel("mixtral-8x7b", "A100-80GB", 1, expert_parallel_size=8)
    assert a100.all_to_all == a100.send_recv["intra_node"]
    across = RooflineLatencyModel(
        "mixtral-8x7b", "A100-80GB", 1, expert_parallel_size=8, gpus_per_node=4
    )
    assert across.all_to_all == across.send_recv["inter_node"]


def one_rank_reads(model: RooflineLatencyModel) -> float:
    """The bytes a lone token of a single rank would read: its 2 of 8 experts."""
    spec = model.model
    experts = expert_param_count(spec) * spec.bytes_per_param
    return (spec.weight_bytes - experts + 0.25 * experts / 8) / model._bytes_s


@pytest.mark.parametrize(
    ("model", "ep", "message"),
    [("llama-3-8b", 2, "is dense: allowed 1"), ("mixtral-8x7b", 16, "allowed: 1 to 8")],
)
def test_roofline_rejects_an_ep_the_model_cannot_have(model: str, ep: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RooflineLatencyModel(model, "H100-SXM", expert_parallel_size=ep)


def test_an_instances_ep_reaches_its_roofline() -> None:
    instance = ExecutionInstance(
        "moe", model_name="mixtral-8x7b", gpu_type="H100-SXM", expert_parallel_size=8
    )
    model, _ = latency_for(instance)
    assert isinstance(model, RooflineLatencyModel) and model.expert_parallel_size == 8


def test_roofline_rejects_more_stages_than_layers() -> None:
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        RooflineLatencyModel("tiny-llama", "L4", pipeline_parallel_size=10_000)


# ---------------------------------------------------------------------- GPUs and KV capacity
@pytest.mark.parametrize("name", ["A100-80GB", "A100-40GB", "H100-SXM", "H200", "L4", "A10G"])
def test_gpu_specs_load_by_name(name: str) -> None:
    gpu = load_gpu_spec(name)
    assert gpu.name == name and gpu.source and gpu.peak_flops > 1e13
    assert name.lower() in available_gpus()


def test_unknown_gpu_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="a100-80gb"):
        load_gpu_spec("TPU-v5")


def test_kv_blocks_from_memory_minus_weights() -> None:
    spec = load_model_spec("llama-3-8b")
    blocks = num_kv_blocks(spec, 80.0, block_size=16)
    per_block = 16 * spec.kv_bytes_per_token()
    expected = (80 * 0.9 * 1024**3 - spec.weight_bytes - 1024**3) // per_block
    assert blocks == expected
    assert num_kv_blocks(spec, 80.0, tensor_parallel_size=2) > 2 * blocks


def test_kv_capacity_is_close_to_the_published_opt_13b_figure() -> None:
    spec = load_model_spec("opt-13b")
    tokens = 16 * num_kv_blocks(spec, 80.0, gpu_memory_utilization=0.95)
    assert tokens == pytest.approx(66_144, rel=0.1)  # DistServe's max_num_tokens.csv, tp1


def test_kv_capacity_error_when_weights_do_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        num_kv_blocks(load_model_spec("llama-3-70b"), 80.0)


def test_a_wide_ep_replica_holds_its_share_of_the_experts() -> None:
    """Mixtral-8x22B (263 GiB of weights, 252 GiB in experts) on one 80 GiB GPU: only
    with its experts spread over 8 GPUs does the rest fit, with KV cache beside it."""
    model = load_model_spec("mixtral-8x22b")
    with pytest.raises(ValueError, match="expert_parallel_size=1; use more GPUs"):
        num_kv_blocks(model, 80.0)
    wide = num_kv_blocks(model, 80.0, expert_parallel_size=8)
    assert wide > 0
    assert num_kv_blocks(model, 80.0, 8, expert_parallel_size=8) == num_kv_blocks(model, 80.0, 8)
