"""Fits ProfiledLatencyModel terms to measured step times (relative least squares) and scores it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cpsim.latency import StepBatch
from cpsim.profiles import ENGINE_PART, TERMS, ProfiledLatencyModel, step_features
from cpsim.validation import check_positive

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class StepSample:
    """One measured step shape: its batch, its (median) time and what kind of batch it was."""

    kind: str
    batch: StepBatch
    time_s: float
    num_repeats: int = 1

    def __post_init__(self) -> None:
        check_positive("time_s", self.time_s)

    def to_dict(self) -> dict[str, Any]:
        b = self.batch
        return {
            "kind": self.kind,
            "time_s": self.time_s,
            "num_repeats": self.num_repeats,
            "batch": [
                b.num_prefill_tokens, b.sum_sq_prefill_tokens, b.prefill_context_tokens,
                b.num_prefill_seqs, b.num_decode_seqs, b.decode_context_tokens,
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepSample:
        return cls(str(data["kind"]), StepBatch(*data["batch"]), float(data["time_s"]),
                   int(data.get("num_repeats", 1)))


@dataclass(frozen=True)
class TermFit:
    """Fitted seconds per term, each term's standard error, and the fit's errors on its data."""

    coefficients: dict[str, float]
    std_errors_s: dict[str, float]
    rmse_s: float
    max_rel_error: float
    median_rel_error: float
    rel_error_by_kind: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0

    def report(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "rmse_ms": round(self.rmse_s * 1e3, 4),
            "max_rel_error": round(self.max_rel_error, 4),
            "median_rel_error": round(self.median_rel_error, 4),
            "median_abs_rel_error_by_kind": {
                k: round(v, 4) for k, v in self.rel_error_by_kind.items()
            },
            "std_error_s": {k: float(f"{v:.4g}") for k, v in self.std_errors_s.items()},
        }


def nnls(a: FloatArray, b: FloatArray, max_iterations: int = 500) -> FloatArray:
    """Non-negative least squares, min |a x - b| with x >= 0 (Lawson and Hanson's active set)."""
    num_cols = a.shape[1]
    x = np.zeros(num_cols)
    passive = np.zeros(num_cols, dtype=bool)
    tol = 1e-10 * max(1.0, float(np.abs(a).max(initial=0.0)) * float(np.abs(b).max(initial=0.0)))
    for _ in range(max_iterations):
        gradient = a.T @ (b - a @ x)
        if passive.all() or float(np.max(np.where(passive, -np.inf, gradient))) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, gradient)))] = True
        while True:
            z = np.zeros(num_cols)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            bad = passive & (z <= 0)
            alpha = float(np.min(x[bad] / (x[bad] - z[bad])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def relative_errors(model: ProfiledLatencyModel, samples: Sequence[StepSample]) -> FloatArray:
    """(predicted - measured) / measured per sample."""
    return np.array([(model.step_time_s(s.batch) - s.time_s) / s.time_s for s in samples])


def fit_terms(
    samples: Sequence[StepSample],
    terms: Iterable[str],
    fixed: Mapping[str, float] | None = None,
    signed: Iterable[str] = (),
) -> TermFit:
    """Fit ``terms`` to ``samples``, every other term held at ``fixed`` (0 where absent).

    Rows are divided by the measured time, so the fit minimises relative error (a 3 ms
    decode step counts as much as a 60 ms prefill). Terms are non-negative unless named in
    ``signed``; a term none of the samples exercises stays 0. ``serving_engine_frac`` is
    fitted against the engine part (the non-serving terms) as ``fixed`` prices it."""
    if not samples:
        raise ValueError("samples=[] is not allowed; a fit needs measured steps")
    fit_names = list(terms)
    unknown = sorted(set(fit_names) - set(TERMS))
    if unknown:
        raise ValueError(f"terms {unknown} are unknown; allowed: {', '.join(TERMS)}")
    base = {t: float((fixed or {}).get(t, 0.0)) for t in TERMS}
    index = [TERMS.index(t) for t in fit_names]
    rows = np.array([step_features(s.batch) for s in samples], dtype=np.float64)
    if "serving_engine_frac" in fit_names or base["serving_engine_frac"]:  # in engine time
        engine = ProfiledLatencyModel("e", "e", {t: base[t] for t in ENGINE_PART})
        rows[:, TERMS.index("serving_engine_frac")] = [engine.step_time_s(s.batch)
                                                       for s in samples]
    times = np.array([s.time_s for s in samples])
    others = np.array([base[t] for t in TERMS]) * (np.array([t not in fit_names for t in TERMS]))
    target = (times - rows @ others) / times
    design = rows[:, index] / times[:, None]
    used = np.abs(design).max(axis=0) > 0
    scale = np.where(used, np.abs(design).max(axis=0), 1.0)
    design = design[:, used] / scale[used]
    names = [n for n, u in zip(fit_names, used, strict=True) if u]
    sign = np.array([-1.0 if n in set(signed) else 0.0 for n in names])
    both = np.hstack([design, design[:, sign < 0] * -1.0])  # x = x+ - x- for signed terms
    solution = nnls(both, target)
    x = solution[: len(names)].copy()
    x[sign < 0] -= solution[len(names):]
    coefficients = dict(base)
    for name, value, s in zip(names, x, scale[used], strict=True):
        coefficients[name] = float(value / s)
    for name in fit_names:
        if name not in names:
            coefficients[name] = 0.0
    std = _std_errors(design, target, x, names, scale[used])
    model = ProfiledLatencyModel("fit", "fit", coefficients)
    rel = relative_errors(model, samples)
    predicted = times * (1.0 + rel)
    kinds = sorted({s.kind for s in samples})
    return TermFit(
        coefficients=coefficients,
        std_errors_s={n: std.get(n, float("nan")) for n in fit_names},
        rmse_s=float(np.sqrt(np.mean((predicted - times) ** 2))),
        max_rel_error=float(np.max(np.abs(rel))),
        median_rel_error=float(np.median(np.abs(rel))),
        rel_error_by_kind={
            k: float(np.median(np.abs(rel[[s.kind == k for s in samples]]))) for k in kinds
        },
        num_samples=len(samples),
    )


def _std_errors(
    design: FloatArray, target: FloatArray, x: FloatArray, names: list[str], scale: FloatArray
) -> dict[str, float]:
    """Standard errors of the terms left free (non-zero), from the residual variance."""
    active = np.abs(x) > 0
    dof = design.shape[0] - int(active.sum())
    out = {n: 0.0 for n in names}
    if dof <= 0 or not active.any():
        return out
    residual = target - design @ x
    sigma2 = float(residual @ residual) / dof
    sub = design[:, active]
    cov = sigma2 * np.linalg.pinv(sub.T @ sub)
    for k, i in enumerate(np.flatnonzero(active)):
        out[names[i]] = float(np.sqrt(max(cov[k, k], 0.0)) / scale[i])
    return out
