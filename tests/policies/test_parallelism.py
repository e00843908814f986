"""Parallelism strategies and ``recommend``: chosen layouts, the fit rule, and clear failures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cpsim.models import ModelSpec, available_models, load_model_spec
from cpsim.parallelism import (
    GB,
    GPUBudget,
    NoFittingLayoutError,
    ParallelismConfig,
    ParallelismStrategy,
    layout_problem,
    resolve_min_kv_tokens,
)
from cpsim.types import ExecutionInstance, ParallelismType
from policies.parallelism import PARALLELISM_STRATEGIES, make_parallelism_strategy, recommend
from policies.parallelism.expert import widest_ep
from policies.parallelism.recommend import SIZE_ROWS, size_row

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "parallelism"
Layout = tuple[int, int, int, int]  # (tp, pp, dp, ep)


def plan(strategy: str, model: str | ModelSpec, num_gpus: int, gpu_memory_gb: float) -> Any:
    spec = load_model_spec(model) if isinstance(model, str) else model
    budget = GPUBudget(num_gpus=num_gpus, gpu_memory_gb=gpu_memory_gb)
    return PARALLELISM_STRATEGIES[strategy]().plan(spec, budget)


def as_tuple(config: ParallelismConfig) -> Layout:
    return config.tp, config.pp, config.dp, config.ep


@pytest.mark.parametrize(
    ("strategy", "model", "num_gpus", "gpu_memory_gb", "expected"),
    [
        ("tensor", "llama-3-8b", 1, 80, (1, 1, 1, 1)),
        ("tensor", "llama-3-8b", 8, 80, (1, 1, 8, 1)),
        ("tensor", "llama-3-70b", 8, 80, (4, 1, 2, 1)),  # TP2: 70.6 GB of weights > 70 usable
        ("tensor", "llama-3-70b", 8, 40, (8, 1, 1, 1)),
        ("pipeline", "llama-3-70b", 8, 80, (1, 3, 2, 1)),
        ("pipeline", "llama-3-70b", 8, 40, (1, 5, 1, 1)),
        ("data", "llama-3-8b", 8, 80, (1, 1, 8, 1)),
        ("data", "tiny-llama", 2, 4, (1, 1, 2, 1)),
        ("expert", "mixtral-8x7b", 8, 80, (1, 1, 8, 8)),  # experts over all 8 GPUs
        ("expert", "mixtral-8x7b", 2, 80, (1, 1, 2, 2)),
        ("expert", "mixtral-8x7b", 16, 80, (1, 1, 16, 8)),  # ep divides num_experts=8
        ("expert", "mixtral-8x22b", 8, 80, (1, 1, 8, 8)),
        ("expert", "mixtral-8x22b", 8, 48, (4, 1, 2, 8)),  # dense weights + KV need TP4
        ("expert", "olmoe-1b-7b", 4, 24, (1, 1, 4, 4)),
        ("hybrid", "llama-3-70b", 8, 80, (4, 1, 2, 1)),  # seed: 8-15 GPUs -> TP4, DP auto
        ("hybrid", "llama-3-70b", 8, 40, (8, 1, 1, 1)),  # TP4 does not fit: tp grows
        ("hybrid", "opt-66b", 16, 80, (4, 2, 2, 1)),  # seed: 16+ GPUs -> TP4 PP2
        ("hybrid", "llama-3.1-405b", 16, 80, (8, 2, 1, 1)),  # TP4 PP2 too small: tp grows
        ("hybrid", "llama-3.1-405b", 32, 40, (8, 4, 1, 1)),  # TP8 PP2, PP3 too small: pp grows
        ("hybrid", "llama-3-8b", 3, 80, (2, 1, 1, 1)),  # seed: under 4 -> TP min(n, 2)
        ("hybrid", "llama-3-8b", 6, 80, (4, 1, 1, 1)),  # seed: 4-7 -> TP4
        ("hybrid", "tiny-llama", 1, 4, (1, 1, 1, 1)),
    ],
)
def test_strategy_picks_layout(
    strategy: str, model: str, num_gpus: int, gpu_memory_gb: float, expected: Layout
) -> None:
    assert as_tuple(plan(strategy, model, num_gpus, gpu_memory_gb)) == expected


@pytest.mark.parametrize(
    ("strategy", "model", "num_gpus", "gpu_memory_gb", "phrases"),
    [
        (
            "tensor",
            "llama-3-70b",
            1,
            80,
            [
                "no tensor layout fits meta-llama/Meta-Llama-3-70B",
                "141.2 GB of weights",
                "70.0 GB usable per GPU",
                "min_kv_tokens=8,192",
                "tried: tp=1 pp=1 dp=1 ep=1",
            ],
        ),
        ("data", "llama-3-70b", 8, 80, ["no data layout", "141.2 GB/GPU of 70.0 GB usable"]),
        ("pipeline", "llama-3-70b", 1, 80, ["no pipeline layout", "1 GPU(s) x 80 GB"]),
        ("hybrid", "llama-3-70b", 1, 80, ["no hybrid layout", "141.2 GB"]),
        ("hybrid", "llama-3-70b", 4, 40, ["tp=4 pp=1 dp=1 ep=1: weights 35.3 GB/GPU of 34.0"]),
        ("tensor", "llama-3.1-405b", 16, 80, ["tp=16 spans nodes (gpus_per_node=8)"]),
        ("tensor", "qwen2.5-7b", 8, 8, ["tp=8 does not divide num_attention_heads=28"]),
        ("expert", "llama-3-8b", 8, 80, ["num_experts=1", "needs a MoE model"]),
        ("expert", "mixtral-8x7b", 1, 80, ["no expert layout", "93.4 GB of weights"]),
    ],
)
def test_strategy_explains_why_nothing_fits(
    strategy: str, model: str, num_gpus: int, gpu_memory_gb: float, phrases: list[str]
) -> None:
    with pytest.raises(ValueError) as error:
        plan(strategy, model, num_gpus, gpu_memory_gb)
    for phrase in phrases:
        assert phrase in str(error.value)


BUDGETS = [(1, 80), (2, 24), (3, 48), (4, 40), (8, 80), (8, 16), (16, 80), (32, 80), (64, 40)]


@pytest.mark.parametrize("strategy", sorted(PARALLELISM_STRATEGIES))
@pytest.mark.parametrize("model", available_models())
def test_every_layout_fits_in_the_budget(strategy: str, model: str) -> None:
    spec = load_model_spec(model)
    for num_gpus, gpu_memory_gb in BUDGETS:
        budget = GPUBudget(num_gpus=num_gpus, gpu_memory_gb=gpu_memory_gb)
        try:
            config = PARALLELISM_STRATEGIES[strategy]().plan(spec, budget)
        except NoFittingLayoutError:
            continue
        except ValueError as error:  # only the expert strategy refuses a model outright
            assert strategy == "expert" and not spec.is_moe, error
            continue
        assert config.gpu_count <= num_gpus
        assert layout_problem(config, spec, budget, spec.max_context_tokens) is None
        assert config.memory(spec, budget).kv_capacity_tokens >= spec.max_context_tokens


@pytest.mark.parametrize(("strategy", "attribute"), [("tensor", "tp"), ("pipeline", "pp")])
@pytest.mark.parametrize("model", ["llama-3-70b", "opt-66b", "qwen2.5-7b", "llama-3.1-405b"])
def test_single_kind_strategies_use_their_dimension_minimally(
    strategy: str, attribute: str, model: str
) -> None:
    spec = load_model_spec(model)
    for num_gpus, gpu_memory_gb in BUDGETS:
        budget = GPUBudget(num_gpus=num_gpus, gpu_memory_gb=gpu_memory_gb)
        try:
            config = PARALLELISM_STRATEGIES[strategy]().plan(spec, budget)
        except NoFittingLayoutError:
            continue
        size = getattr(config, attribute)
        assert config.dp == num_gpus // config.replica_gpu_count  # leftover GPUs: replicas
        if size > 1:
            smaller = dataclasses.replace(
                config, **{attribute: size // 2 if attribute == "tp" else size - 1}
            )
            assert layout_problem(smaller, spec, budget, spec.max_context_tokens) is not None


@pytest.mark.parametrize(
    ("model", "num_gpus", "gpu_memory_gb", "expected"),
    [
        ("llama-3-8b", 1, 80, (1, 1, 1, 1)),  # <10B on 1-2 GPUs: TP1 ...
        ("llama-3-8b", 2, 80, (1, 1, 2, 1)),
        ("llama-2-7b", 2, 16, (2, 1, 1, 1)),  # ... or TP2 when TP1 does not fit
        ("qwen2.5-7b", 8, 80, (1, 1, 8, 1)),  # leftover GPUs become replicas
        ("llama-2-13b", 4, 80, (4, 1, 1, 1)),  # 10-30B: TP4
        ("opt-13b", 8, 80, (4, 1, 2, 1)),
        ("llama-2-13b", 1, 80, (1, 1, 1, 1)),  # TP4 shrunk to the one GPU at hand
        ("llama-3-70b", 8, 80, (4, 1, 2, 1)),  # 30-70B: TP4 ...
        ("llama-3-70b", 8, 40, (8, 1, 1, 1)),  # ... or TP8
        ("llama-3-70b", 16, 24, (8, 1, 2, 1)),
        ("llama-3-70b", 16, 20, (8, 2, 1, 1)),  # TP8 still too small: pp grows
        ("llama-3.1-405b", 32, 80, (8, 4, 1, 1)),  # >175B: TP8 PP4
        ("llama-3.1-405b", 16, 80, (8, 2, 1, 1)),  # PP4 shrunk to 16 GPUs, still fits
        ("mixtral-8x7b", 8, 80, (4, 1, 2, 8)),  # MoE: EP + the size row's TP
        ("mixtral-8x22b", 8, 80, (4, 2, 1, 4)),  # 140.6B: TP4 PP2, experts over TP x DP
        ("olmoe-1b-7b", 8, 80, (1, 1, 8, 8)),
    ],
)
def test_recommend_follows_the_table(
    model: str, num_gpus: int, gpu_memory_gb: float, expected: Layout
) -> None:
    assert as_tuple(recommend(load_model_spec(model), num_gpus, gpu_memory_gb)) == expected


def test_recommend_uses_tp4_pp2_for_a_dense_70_to_175b_model() -> None:
    dense_120b = dataclasses.replace(load_model_spec("llama-3-70b"), num_params=120e9)
    assert as_tuple(recommend(dense_120b, 8)) == (4, 2, 1, 1)


@pytest.mark.parametrize(
    ("num_params", "row"),
    [
        (9.9e9, 0),
        (10.9e9, 0),
        (11e9, 1),
        (32.9e9, 1),
        (33e9, 2),
        (70.6e9, 2),
        (76.9e9, 2),
        (77e9, 3),
        (175e9, 3),
        (192.5e9, 4),
        (405.85e9, 4),
    ],
)
def test_size_row_boundaries(num_params: float, row: int) -> None:
    spec = dataclasses.replace(load_model_spec("llama-3-8b"), num_params=num_params)
    assert size_row(spec) == SIZE_ROWS[row][1]


@pytest.mark.parametrize(
    ("model", "num_gpus", "gpu_memory_gb"),
    [
        ("llama-3-70b", 1, 80),
        ("llama-3-70b", 4, 40),
        ("llama-3.1-405b", 8, 80),
        ("mixtral-8x22b", 2, 80),
    ],
)
def test_recommend_never_returns_a_layout_that_does_not_fit(
    model: str, num_gpus: int, gpu_memory_gb: float
) -> None:
    with pytest.raises(NoFittingLayoutError, match="no recommended layout fits"):
        recommend(load_model_spec(model), num_gpus, gpu_memory_gb)


@pytest.mark.parametrize("model", available_models())
@pytest.mark.parametrize(("num_gpus", "gpu_memory_gb"), BUDGETS)
def test_recommended_layouts_fit(model: str, num_gpus: int, gpu_memory_gb: float) -> None:
    spec = load_model_spec(model)
    try:
        config = recommend(spec, num_gpus, gpu_memory_gb)
    except NoFittingLayoutError:
        return
    budget = GPUBudget(num_gpus=num_gpus, gpu_memory_gb=gpu_memory_gb)
    assert config.gpu_count <= num_gpus
    assert layout_problem(config, spec, budget, spec.max_context_tokens) is None
    assert config.ep == 1 or spec.is_moe
    if spec.is_moe:  # "MoE: EP+TP": experts over the widest EP the layout allows
        assert config.ep == widest_ep(spec, config.tp, config.dp)


def test_memory_breakdown_of_llama_3_70b_on_tp4() -> None:
    spec, budget = load_model_spec("llama-3-70b"), GPUBudget(num_gpus=4, gpu_memory_gb=80)
    memory = ParallelismConfig(tp=4).memory(spec, budget)
    kv_per_token = 80 * 2 * 2 * 128 * 2  # layers x (K, V) x 8/4 KV heads x head_dim x bytes
    assert memory.weight_bytes_per_gpu == pytest.approx(70.6e9 * 2 / 4)
    assert memory.usable_bytes_per_gpu == pytest.approx((80 * 0.9 - 2) * GB)
    assert memory.kv_bytes_per_token_per_gpu == pytest.approx(kv_per_token)
    assert memory.kv_capacity_tokens == int((70e9 - 35.3e9) // kv_per_token)


@pytest.mark.parametrize(
    ("config", "kv_heads_per_gpu", "layers_per_stage"),
    [
        (ParallelismConfig(tp=8), 1, 126),
        (ParallelismConfig(tp=16), 1, 126),  # past 8 KV heads vLLM replicates them
        (ParallelismConfig(tp=8, pp=4), 1, 32),  # 126 layers: the fullest stage has 32
        (ParallelismConfig(tp=2, pp=5), 4, 26),
    ],
)
def test_kv_and_weights_per_gpu_follow_heads_and_stages(
    config: ParallelismConfig, kv_heads_per_gpu: int, layers_per_stage: int
) -> None:
    spec = load_model_spec("llama-3.1-405b")
    memory = config.memory(spec, GPUBudget(num_gpus=64, gpu_memory_gb=80))
    assert memory.kv_bytes_per_token_per_gpu == layers_per_stage * 2 * kv_heads_per_gpu * 128 * 2
    expected_weights = spec.weight_bytes * layers_per_stage / 126 / config.tp
    assert memory.weight_bytes_per_gpu == pytest.approx(expected_weights)


def test_expert_weights_are_sharded_by_ep() -> None:
    spec, budget = load_model_spec("mixtral-8x7b"), GPUBudget(num_gpus=8, gpu_memory_gb=80)
    expert_bytes = 32 * 8 * 3 * 4096 * 14336 * 2
    dense_bytes = spec.weight_bytes - expert_bytes
    memory = ParallelismConfig(tp=1, dp=8, ep=8).memory(spec, budget)
    assert memory.weight_bytes_per_gpu == pytest.approx(dense_bytes + expert_bytes / 8)
    tp2 = ParallelismConfig(tp=2, dp=4, ep=1).memory(spec, budget)
    assert tp2.weight_bytes_per_gpu == pytest.approx(spec.weight_bytes / 2)


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (ParallelismConfig(), ParallelismType.DATA_PARALLEL),
        (ParallelismConfig(dp=4), ParallelismType.DATA_PARALLEL),
        (ParallelismConfig(tp=4), ParallelismType.TENSOR_PARALLEL),
        (ParallelismConfig(pp=2), ParallelismType.PIPELINE_PARALLEL),
        (ParallelismConfig(tp=1, dp=8, ep=8), ParallelismType.EXPERT_PARALLEL),
        (ParallelismConfig(tp=4, dp=2, ep=8), ParallelismType.EXPERT_PARALLEL),
        (ParallelismConfig(tp=4, dp=2), ParallelismType.HYBRID),
        (ParallelismConfig(tp=4, pp=2, ep=4), ParallelismType.HYBRID),
    ],
)
def test_kind(config: ParallelismConfig, kind: ParallelismType) -> None:
    assert config.kind is kind


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (ParallelismConfig(tp=3), "tp=3 is not a power of two"),
        (ParallelismConfig(tp=16), "tp=16 spans nodes"),
        (ParallelismConfig(pp=3), "needs 3 GPUs, budget has num_gpus=2"),
        (ParallelismConfig(ep=2, dp=2), "ep=2 needs a MoE model"),
    ],
)
def test_layout_problem_names_the_rule(config: ParallelismConfig, problem: str) -> None:
    budget = GPUBudget(num_gpus=2 if config.pp == 3 else 64, gpu_memory_gb=80)
    found = layout_problem(config, load_model_spec("llama-3-8b"), budget, 1)
    assert found is not None and problem in found


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (ParallelismConfig(tp=1, dp=4, ep=3), "ep=3 does not divide num_experts=8"),
        (ParallelismConfig(tp=1, dp=2, ep=4), "ep=4 does not divide tp x dp = 2"),
    ],
)
def test_layout_problem_checks_experts(config: ParallelismConfig, problem: str) -> None:
    budget = GPUBudget(num_gpus=8, gpu_memory_gb=80)
    found = layout_problem(config, load_model_spec("mixtral-8x7b"), budget, 1)
    assert found is not None and problem in found


def test_layout_feeds_an_execution_instance() -> None:
    config = ParallelismConfig(tp=4, pp=2, dp=2)
    instance = ExecutionInstance(instance_id="i0", **config.instance_fields())
    assert instance.num_gpus == config.gpu_count == 16


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: GPUBudget(num_gpus=0, gpu_memory_gb=80), "num_gpus"),
        (lambda: GPUBudget(num_gpus=2.5, gpu_memory_gb=80), "num_gpus"),  # type: ignore[arg-type]
        (lambda: GPUBudget(num_gpus=1, gpu_memory_gb=-80), "gpu_memory_gb"),
        (
            lambda: GPUBudget(1, 80, interconnect_bandwidth_gb_per_s=0),
            "interconnect_bandwidth_gb_per_s",
        ),
        (lambda: GPUBudget(1, 80, gpus_per_node=0), "gpus_per_node"),
        (lambda: GPUBudget(1, 80, gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (lambda: GPUBudget(1, 80, gpu_memory_utilization=0), "gpu_memory_utilization"),
        (lambda: GPUBudget(1, 80, runtime_overhead_gb=-1), "runtime_overhead_gb"),
        (lambda: ParallelismConfig(tp=0), "tp"),
        (lambda: ParallelismConfig(dp=-1), "dp"),
        (lambda: PARALLELISM_STRATEGIES["tensor"](min_kv_tokens=0), "min_kv_tokens"),
        (lambda: resolve_min_kv_tokens(load_model_spec("llama-3-8b"), -5), "min_kv_tokens"),
        (lambda: recommend(load_model_spec("llama-3-8b"), 0), "num_gpus"),
        (lambda: recommend(load_model_spec("llama-3-8b"), 4, -80.0), "gpu_memory_gb"),
    ],
)
def test_bad_input_names_the_field(build: Any, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}="):
        build()


def test_min_kv_tokens_is_part_of_the_fit() -> None:
    spec, budget = load_model_spec("llama-3-8b"), GPUBudget(num_gpus=2, gpu_memory_gb=24)
    assert PARALLELISM_STRATEGIES["tensor"](min_kv_tokens=8192).plan(spec, budget).tp == 1
    # 24 GB x 0.9 - 2 = 19.6 GB usable; 16.1 GB of weights leave ~3.5 GB = ~27k tokens
    assert PARALLELISM_STRATEGIES["tensor"](min_kv_tokens=100_000).plan(spec, budget).tp == 2


def test_every_config_file_builds_its_strategy() -> None:
    files = sorted(CONF_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(PARALLELISM_STRATEGIES)
    for file in files:
        strategy = instantiate(OmegaConf.load(file))
        assert type(strategy) is PARALLELISM_STRATEGIES[file.stem]
        assert isinstance(strategy, ParallelismStrategy)
        assert strategy.name == file.stem


def test_gpus_left_over_by_the_layout_stay_idle() -> None:
    config = plan("hybrid", "llama-3-8b", 3, 80)  # seed: TP2 under 4 GPUs; 3 // 2 = 1 replica
    assert (config.gpu_count, config.kind) == (2, ParallelismType.TENSOR_PARALLEL)


def test_make_parallelism_strategy_by_name() -> None:
    strategy = make_parallelism_strategy("hybrid", min_kv_tokens=1024)
    assert isinstance(strategy, PARALLELISM_STRATEGIES["hybrid"])
    with pytest.raises(ValueError, match="unknown parallelism strategy 'tensr'; allowed: data"):
        make_parallelism_strategy("tensr")
