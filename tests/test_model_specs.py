"""The model-spec data files: each loads, and its parameter counts agree with its shape."""

from __future__ import annotations

import dataclasses

import pytest

from cpsim.models import ModelSpec, available_models, load_model_spec

#: Relative tolerance between a file's num_params and the count from its shape: the formula
#: leaves out norms, biases and learned position embeddings (under 0.2% for these models).
TOLERANCE_FRAC = 0.01

#: Architectures that differ from the default (gated SwiGLU MLP, untied LM head): OPT and
#: BLOOM have a plain two-matrix MLP and tie their LM head to the embedding. MoE counts
#: include all experts (num_params) or the routed ones (num_active_params); no file has
#: shared experts or MLA.
PLAIN_MLP_TIED_HEAD = {"opt-13b", "opt-66b", "bloom-176b"}


def count_params(spec: ModelSpec, *, experts: int, plain_mlp: bool, tied_head: bool) -> float:
    """embedding (+ LM head) + layers x (attention + ``experts`` MLPs + router)."""
    h, head_dim = spec.hidden_size, spec.head_dim
    attention = 2 * h * spec.num_attention_heads * head_dim + 2 * h * spec.num_kv_heads * head_dim
    mlp = (2 if plain_mlp else 3) * h * spec.intermediate_size * experts
    router = h * spec.num_experts if spec.is_moe else 0
    embeddings = spec.vocab_size * h * (1 if tied_head else 2)
    return float(embeddings + spec.num_layers * (attention + mlp + router))


def shape_counts(name: str, spec: ModelSpec) -> tuple[float, float]:
    """(all parameters, active parameters per token) from the shape."""
    arch = {"plain_mlp": name in PLAIN_MLP_TIED_HEAD, "tied_head": name in PLAIN_MLP_TIED_HEAD}
    total = count_params(spec, experts=spec.num_experts, **arch)
    active = count_params(spec, experts=spec.num_experts_per_token, **arch)
    return total, active


def relative_error(stated: float, counted: float) -> float:
    return abs(stated - counted) / counted


MODELS = available_models()


def test_the_expected_models_ship() -> None:
    expected = {"llama-3-8b", "llama-3-70b", "mixtral-8x7b", "opt-13b", "opt-66b", "tiny-llama",
                "llama-2-7b", "llama-2-13b", "llama-3.1-405b", "mixtral-8x22b", "qwen2.5-7b",
                "olmoe-1b-7b", "llama-2-70b", "bloom-176b"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_num_params_matches_the_shape(name: str) -> None:
    spec = load_model_spec(name)
    total, active = shape_counts(name, spec)
    assert relative_error(spec.num_params, total) < TOLERANCE_FRAC, (name, spec.num_params, total)
    assert relative_error(spec.active_params, active) < TOLERANCE_FRAC, (name, active)


@pytest.mark.parametrize("name", MODELS)
def test_shape_is_consistent(name: str) -> None:
    spec = load_model_spec(name)
    assert spec.source, f"{name}: say where the numbers come from"
    assert spec.head_dim * spec.num_attention_heads == spec.hidden_size
    assert spec.num_attention_heads % spec.num_kv_heads == 0
    assert spec.num_experts_per_token <= spec.num_experts
    assert (spec.num_active_params != spec.num_params) == spec.is_moe


def test_names_are_unique() -> None:
    names = [load_model_spec(m).name for m in MODELS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("name", "typo"),
    [
        ("llama-3-8b", {"intermediate_size": 1436}),  # a dropped digit
        ("llama-3-70b", {"num_layers": 8}),
        ("mixtral-8x7b", {"num_experts": 4}),
        ("opt-66b", {"hidden_size": 9126}),
        ("qwen2.5-7b", {"num_params": 76.1e9}),  # a misplaced point
    ],
)
def test_the_check_catches_a_typo(name: str, typo: dict[str, float]) -> None:
    spec = dataclasses.replace(load_model_spec(name), **typo)  # type: ignore[arg-type]
    total, _ = shape_counts(name, spec)
    assert relative_error(spec.num_params, total) >= TOLERANCE_FRAC


def test_kv_bytes_per_token_of_llama_3_8b() -> None:
    # 32 layers x (K and V) x 8 KV heads x 128 dims x 2 bytes
    assert load_model_spec("llama-3-8b").kv_bytes_per_token() == 32 * 2 * 8 * 128 * 2
