"""Model specifications (the sizes behind memory, FLOPs and KV bytes), loaded from data files."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from cpsim.datafiles import data_names, from_known_keys, read_data
from cpsim.validation import check_positive


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A transformer's shape. ``num_params`` counts all weights (all experts for MoE);
    ``num_active_params`` those used per token (equal for dense models)."""

    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    num_experts: int = 1
    num_experts_per_token: int = 1
    num_active_params: float | None = None
    bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0
    max_context_tokens: int = 8192
    source: str = ""

    def __post_init__(self) -> None:
        for f in (
            "num_params",
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "vocab_size",
            "intermediate_size",
            "num_experts",
            "num_experts_per_token",
            "bytes_per_param",
            "kv_bytes_per_elem",
            "max_context_tokens",
        ):
            check_positive(f, getattr(self, f))
        if self.num_active_params is None:
            object.__setattr__(self, "num_active_params", self.num_params)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.bytes_per_param

    @property
    def active_params(self) -> float:
        return float(self.num_active_params or self.num_params)

    def kv_bytes_per_token(self) -> float:
        """K and V for every layer: layers x 2 x kv_heads x head_dim x bytes."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return from_known_keys(cls, data, "model-spec")


def available_models() -> list[str]:
    return data_names("models")


@cache
def load_model_spec(name: str) -> ModelSpec:
    """A spec by short name (``llama-3-8b``) from cpsim's data files, or from a JSON path."""
    return ModelSpec.from_dict(read_data("models", name, "model"))
