"""Request mix: priorities, users, SLO deadlines, cost budgets and model names, in batches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from cpsim.types import RequestPriority, coerce_enum
from cpsim.validation import check_choice, check_non_negative, check_positive
from cpsim.workload.traces import FloatArray, IntArray

USER_DISTRIBUTIONS = ("uniform", "zipf")


@dataclass(frozen=True, slots=True)
class MixColumns:
    """Per-request attributes of one batch, as parallel lists (index i = request i)."""

    priorities: list[RequestPriority]
    user_ids: list[str]
    slo_deadline_ms: list[float] | None
    model_names: list[str] | None = None  # when the mix draws models (``models``)


def _cdf(weights: FloatArray) -> FloatArray:
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return cdf


@dataclass(frozen=True)
class RequestMix:
    """Who asks, how urgently, and by when.

    - ``priorities``: priority name -> probability (normalised), e.g. ``{high: 0.2, normal: 0.8}``;
    - users ``{user_prefix}{k}`` for k in [0, ``num_users``), chosen ``uniform``-ly or by a
      Zipf law with exponent ``zipf_s`` (user 0 the most active);
    - SLO deadline: ``slo_ms`` fixed, or ``slo_multiplier`` x (``slo_base_ms`` +
      ``slo_per_prompt_token_ms`` x prompt + ``slo_per_output_token_ms`` x max_tokens), an
      ideal-latency estimate scaled by a slack factor; none when neither is given;
    - ``cost_budget`` and ``model_name`` copied onto every request; or ``models``: model name
      -> probability, each request asking for one of them (several models at once).
    """

    priorities: Mapping[str, float] = field(default_factory=lambda: {"normal": 1.0})
    num_users: int = 1
    user_distribution: str = "uniform"
    zipf_s: float = 1.1
    user_prefix: str = "user-"
    slo_ms: float | None = None
    slo_base_ms: float | None = None
    slo_per_prompt_token_ms: float = 0.0
    slo_per_output_token_ms: float = 0.0
    slo_multiplier: float = 1.0
    cost_budget: float | None = None
    model_name: str | None = None
    models: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "priorities", {str(k): v for k, v in self.priorities.items()})
        if not self.priorities:
            raise ValueError("priorities={} is not allowed; give at least one name -> probability")
        for name, prob in self.priorities.items():
            coerce_enum(RequestPriority, name, "priorities key")
            check_non_negative(f"priorities[{name!r}]", prob)
        if sum(self.priorities.values()) <= 0:
            raise ValueError(f"priorities={self.priorities!r} must have a positive total")
        check_positive("num_users", self.num_users, integer=True)
        check_choice("user_distribution", self.user_distribution, USER_DISTRIBUTIONS)
        check_positive("zipf_s", self.zipf_s)
        if self.slo_ms is not None and self.slo_base_ms is not None:
            raise ValueError(
                f"slo_ms={self.slo_ms} and slo_base_ms={self.slo_base_ms}: give at most one"
            )
        if self.slo_ms is not None:
            check_positive("slo_ms", self.slo_ms)
        if self.slo_base_ms is not None:
            check_non_negative("slo_base_ms", self.slo_base_ms)
        check_non_negative("slo_per_prompt_token_ms", self.slo_per_prompt_token_ms)
        check_non_negative("slo_per_output_token_ms", self.slo_per_output_token_ms)
        check_positive("slo_multiplier", self.slo_multiplier)
        if self.cost_budget is not None:
            check_non_negative("cost_budget", self.cost_budget)
        if self.models is not None:
            object.__setattr__(self, "models", {str(k): v for k, v in self.models.items()})
            if self.model_name is not None:
                raise ValueError(
                    f"model_name={self.model_name!r} and models={dict(self.models)!r}: give one"
                )
            if not self.models:
                raise ValueError("models={} is not allowed; give model name -> probability")
            for name, prob in self.models.items():
                check_non_negative(f"models[{name!r}]", prob)
            if sum(self.models.values()) <= 0:
                raise ValueError(f"models={dict(self.models)!r} must have a positive total")

    @cached_property
    def _priority_table(self) -> tuple[list[RequestPriority], FloatArray]:
        members = [coerce_enum(RequestPriority, k, "priorities key") for k in self.priorities]
        weights = np.asarray(list(self.priorities.values()), dtype=np.float64)
        return members, _cdf(weights)

    @cached_property
    def _user_table(self) -> tuple[list[str], FloatArray]:
        names = [f"{self.user_prefix}{k}" for k in range(self.num_users)]
        ranks = np.arange(1, self.num_users + 1, dtype=np.float64)
        zipf = self.user_distribution == "zipf"
        weights = ranks**-self.zipf_s if zipf else np.ones(self.num_users)
        return names, _cdf(weights)

    def slo_for(self, prompt_tokens: IntArray, output_tokens: IntArray) -> FloatArray | None:
        """Deadlines in ms for requests of these lengths (None: no SLO)."""
        if self.slo_ms is not None:
            return np.full(prompt_tokens.shape, float(self.slo_ms))
        if self.slo_base_ms is None:
            return None
        ideal_ms = (
            self.slo_base_ms
            + self.slo_per_prompt_token_ms * prompt_tokens
            + self.slo_per_output_token_ms * output_tokens
        )
        return np.maximum(self.slo_multiplier * ideal_ms, 1e-3)

    def sample(
        self, rng: np.random.Generator, prompt_tokens: IntArray, output_tokens: IntArray
    ) -> MixColumns:
        n = int(prompt_tokens.size)
        members, priority_cdf = self._priority_table
        names, user_cdf = self._user_table
        # One uniform per request and attribute, so the draws do not depend on table sizes.
        picks = rng.random((2, n))
        priority_idx = np.searchsorted(priority_cdf, picks[0], side="right").tolist()
        user_idx = np.searchsorted(user_cdf, picks[1], side="right").tolist()
        slo = self.slo_for(prompt_tokens, output_tokens)
        model_names = None
        if self.models:
            # from a child stream (spawning draws nothing from ``rng``): users, priorities
            # and SLOs come out as they would without models
            models = list(self.models)
            cdf = _cdf(np.asarray(list(self.models.values()), dtype=np.float64))
            picks_model = rng.spawn(1)[0].random(n)
            model_idx = np.searchsorted(cdf, picks_model, side="right").tolist()
            model_names = [models[i] for i in model_idx]
        return MixColumns(
            priorities=[members[i] for i in priority_idx],
            user_ids=[names[i] for i in user_idx],
            slo_deadline_ms=None if slo is None else slo.tolist(),
            model_names=model_names,
        )

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "priorities": dict(self.priorities),
            "num_users": self.num_users,
            "user_distribution": self.user_distribution,
        }
        if self.slo_ms is not None:
            out["slo_ms"] = self.slo_ms
        elif self.slo_base_ms is not None:
            out["slo_ms"] = (
                f"{self.slo_multiplier} x ({self.slo_base_ms} + {self.slo_per_prompt_token_ms}"
                f" x prompt + {self.slo_per_output_token_ms} x output)"
            )
        for name in ("cost_budget", "model_name"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.models:
            out["models"] = dict(self.models)
        return out
