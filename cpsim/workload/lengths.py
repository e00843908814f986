"""Token-length distributions for prompts and outputs, alone or as joint (prompt, output) pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cpsim.validation import check_non_negative, check_positive
from cpsim.workload.traces import IntArray, TraceTable, load_trace

#: Standard normal quantile at 0.99 (for LogNormal given by median and p99).
Z_P99 = 2.3263478740408408


@runtime_checkable
class LengthDistribution(Protocol):
    """Token counts of one kind (prompt or output); ``expected_tokens`` is the mean it samples."""

    @property
    def expected_tokens(self) -> float: ...

    def sample(self, rng: np.random.Generator, n: int) -> IntArray: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class PairLengths(Protocol):
    """Joint (prompt, output) token counts, for sources where the two are correlated."""

    @property
    def expected_prompt_tokens(self) -> float: ...

    @property
    def expected_output_tokens(self) -> float: ...

    def sample_pairs(self, rng: np.random.Generator, n: int) -> tuple[IntArray, IntArray]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class FixedLengths:
    """Always ``tokens``."""

    tokens: int

    def __post_init__(self) -> None:
        check_non_negative("tokens", self.tokens, integer=True)

    @property
    def expected_tokens(self) -> float:
        return float(self.tokens)

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        return np.full(n, self.tokens, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"lengths": "fixed", "tokens": self.tokens}


@dataclass(frozen=True)
class UniformLengths:
    """Integers uniform on [``low_tokens``, ``high_tokens``], both included."""

    low_tokens: int
    high_tokens: int

    def __post_init__(self) -> None:
        check_non_negative("low_tokens", self.low_tokens, integer=True)
        check_non_negative("high_tokens", self.high_tokens, integer=True)
        if self.high_tokens < self.low_tokens:
            raise ValueError(
                f"high_tokens={self.high_tokens} is not allowed; it must be >= "
                f"low_tokens={self.low_tokens}"
            )

    @property
    def expected_tokens(self) -> float:
        return 0.5 * (self.low_tokens + self.high_tokens)

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        return rng.integers(self.low_tokens, self.high_tokens + 1, size=n, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {
            "lengths": "uniform",
            "low_tokens": self.low_tokens,
            "high_tokens": self.high_tokens,
        }


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@dataclass(frozen=True)
class LogNormalLengths:
    """Log-normal token counts, rounded and clipped to [``min_tokens``, ``max_tokens``].

    Give the location as ``median_tokens`` or ``mean_tokens`` (of the unclipped law) and the
    spread as ``sigma`` (of the log) or ``p99_tokens``.
    """

    median_tokens: float | None = None
    mean_tokens: float | None = None
    sigma: float | None = None
    p99_tokens: float | None = None
    min_tokens: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.median_tokens is None) == (self.mean_tokens is None):
            raise ValueError(
                f"median_tokens={self.median_tokens!r}, mean_tokens={self.mean_tokens!r}: "
                "give exactly one of them"
            )
        if (self.sigma is None) == (self.p99_tokens is None):
            raise ValueError(
                f"sigma={self.sigma!r}, p99_tokens={self.p99_tokens!r}: give exactly one of them"
            )
        for name in ("median_tokens", "mean_tokens", "p99_tokens"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.sigma is not None:
            check_non_negative("sigma", self.sigma)
        check_non_negative("min_tokens", self.min_tokens, integer=True)
        if self.max_tokens is not None:
            check_positive("max_tokens", self.max_tokens, integer=True)
            if self.max_tokens < self.min_tokens:
                raise ValueError(
                    f"max_tokens={self.max_tokens} is not allowed; it must be >= "
                    f"min_tokens={self.min_tokens}"
                )
        self.mu_sigma  # noqa: B018  (validates p99 against the location now, not at sampling)

    @cached_property
    def mu_sigma(self) -> tuple[float, float]:
        """(mu, sigma) of the underlying normal."""
        if self.sigma is not None:
            sigma = float(self.sigma)
            if self.median_tokens is not None:
                return math.log(self.median_tokens), sigma
            return math.log(float(self.mean_tokens or 1.0)) - 0.5 * sigma * sigma, sigma
        log_p99 = math.log(float(self.p99_tokens or 1.0))
        if self.median_tokens is not None:
            mu = math.log(self.median_tokens)
            if log_p99 < mu:
                raise ValueError(
                    f"p99_tokens={self.p99_tokens} is not allowed; it must be >= "
                    f"median_tokens={self.median_tokens}"
                )
            return mu, (log_p99 - mu) / Z_P99
        # mu + sigma^2/2 = log(mean) and mu + z sigma = log(p99): the smaller root in sigma.
        gap = log_p99 - math.log(float(self.mean_tokens or 1.0))
        disc = Z_P99 * Z_P99 - 2.0 * gap
        if gap < 0 or disc < 0:
            raise ValueError(
                f"p99_tokens={self.p99_tokens} is not allowed with mean_tokens={self.mean_tokens}; "
                "need mean <= p99 <= mean * exp(z99^2 / 2) (about 15x)"
            )
        sigma = Z_P99 - math.sqrt(disc)
        return math.log(float(self.mean_tokens or 1.0)) - 0.5 * sigma * sigma, sigma

    @property
    def expected_tokens(self) -> float:
        """Mean of the clipped law (rounding to integers ignored)."""
        mu, sigma = self.mu_sigma
        low = max(float(self.min_tokens), 1e-300)
        high = math.inf if self.max_tokens is None else float(self.max_tokens)
        if sigma == 0:
            return min(max(math.exp(mu), low), high)
        a = (math.log(low) - mu) / sigma
        b = math.inf if math.isinf(high) else (math.log(high) - mu) / sigma
        mass = _normal_cdf(b - sigma) - _normal_cdf(a - sigma)
        body = math.exp(mu + 0.5 * sigma * sigma) * mass
        tail_high = 0.0 if math.isinf(high) else high * (1.0 - _normal_cdf(b))
        return low * _normal_cdf(a) + body + tail_high

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        mu, sigma = self.mu_sigma
        raw = np.rint(rng.lognormal(mu, sigma, n))
        high = np.inf if self.max_tokens is None else self.max_tokens
        return np.clip(raw, self.min_tokens, high).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        mu, sigma = self.mu_sigma
        return {
            "lengths": "lognormal",
            "median_tokens": round(math.exp(mu), 3),
            "sigma": round(sigma, 4),
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
        }


@dataclass(frozen=True)
class IndependentPairLengths:
    """Prompt and output drawn independently from two marginals."""

    prompt: LengthDistribution
    output: LengthDistribution

    @property
    def expected_prompt_tokens(self) -> float:
        return self.prompt.expected_tokens

    @property
    def expected_output_tokens(self) -> float:
        return self.output.expected_tokens

    def sample_pairs(self, rng: np.random.Generator, n: int) -> tuple[IntArray, IntArray]:
        return self.prompt.sample(rng, n), self.output.sample(rng, n)

    def describe(self) -> dict[str, Any]:
        return {"prompt": self.prompt.describe(), "output": self.output.describe()}


@dataclass(frozen=True)
class TraceSampledLengths:
    """(prompt, output) pairs drawn jointly, with replacement, from the rows of a trace file
    (a relative ``path`` is inside ``default_trace_dir()``). The file is read on first use."""

    path: str
    format: str = "auto"

    @cached_property
    def table(self) -> TraceTable:
        return load_trace(self.path, self.format)

    @property
    def expected_prompt_tokens(self) -> float:
        return float(self.table.prompt_tokens.mean())

    @property
    def expected_output_tokens(self) -> float:
        return float(self.table.output_tokens.mean())

    def sample_pairs(self, rng: np.random.Generator, n: int) -> tuple[IntArray, IntArray]:
        rows = rng.integers(0, len(self.table), size=n)
        return self.table.prompt_tokens[rows], self.table.output_tokens[rows]

    def describe(self) -> dict[str, Any]:
        return {"lengths": "trace_sampled", "path": self.path, "format": self.format}


def clip_to_context(
    prompt_tokens: IntArray, output_tokens: IntArray, max_context_tokens: int | None
) -> tuple[IntArray, IntArray]:
    """Make every request fit: at least one prompt and one output token, and, with a context
    limit, prompt + output <= ``max_context_tokens`` by cutting the output to at most half the
    context only when it must, then the prompt (a prompt truncated to fit the window)."""
    prompt = np.maximum(prompt_tokens, 1)
    output = np.maximum(output_tokens, 1)
    if max_context_tokens is None:
        return prompt, output
    check_positive("max_context_tokens", max_context_tokens, integer=True)
    if max_context_tokens < 2:
        raise ValueError(f"max_context_tokens={max_context_tokens} is not allowed; it must be >= 2")
    output = np.minimum(output, np.maximum(max_context_tokens - prompt, max_context_tokens // 2))
    return np.minimum(prompt, max_context_tokens - output), output
