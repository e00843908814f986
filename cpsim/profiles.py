"""Profiled step latency: a linear model over batch features, saved as conf/profile/*.yaml."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from cpsim.datafiles import PROFILE_DIR
from cpsim.latency import StepBatch, StepLatencyModel
from cpsim.protocols import LatencyEstimate
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import InstanceView, RequestView

#: The terms of the linear model, in seconds per unit of the named feature.
TERMS = (
    "step_s",  # every non-empty step (CPU scheduling, kernel launches, weight reads)
    "prefill_step_s",  # added when the step computes prefill tokens
    "prefill_token_s",  # per prefill token (the linear layers)
    "prefill_token_sq_s",  # per squared prefill chunk length (attention within the chunk)
    "prefill_context_token_s",  # per context token a prefill chunk attends to
    "decode_seq_s",  # per decoding sequence
    "decode_context_token_s",  # per context token the decoding sequences attend to
    "serving_step_s",  # per step, outside the engine step (engine-core IPC, output processing)
    "serving_seq_s",  # per sequence in the step, outside the engine step (per-request outputs)
    "step_token_sq_s",  # per squared token count of the step (working set outgrowing caches)
    "serving_prefill_token_s",  # per prefill token, what the serving path adds (worker, inputs)
    "mixed_decode_seq_s",  # per decoding sequence of a step that also computes prefill tokens
    "mixed_decode_context_token_s",  # per decode context token of a step with prefill tokens
    "serving_engine_frac",  # the serving path's slowdown of the engine step (x engine time)
    "serving_prefill_seq_s",  # per sequence with prefill tokens (admission, first output)
)

#: Terms priced per unit of a batch feature; serving_engine_frac multiplies the engine part.
ENGINE_PART = tuple(t for t in TERMS if not t.startswith("serving_"))


def step_features(batch: StepBatch) -> tuple[float, ...]:
    """The units each term of TERMS is paid for in one step (the fit's design row); the entry
    of ``serving_engine_frac`` is 0 here (its unit is the engine part's time, see fit_terms)."""
    if batch.num_prefill_tokens == 0 and batch.num_decode_seqs == 0:
        return (0.0,) * len(TERMS)
    prefill = 1.0 if batch.num_prefill_tokens else 0.0
    mixed = prefill * batch.num_decode_seqs
    return (
        1.0,
        prefill,
        float(batch.num_prefill_tokens),
        float(batch.sum_sq_prefill_tokens),
        float(batch.prefill_context_tokens),
        float(batch.num_decode_seqs),
        float(batch.decode_context_tokens),
        1.0,
        float(batch.num_decode_seqs + batch.num_prefill_seqs),
        float(batch.num_prefill_tokens + batch.num_decode_seqs) ** 2,
        float(batch.num_prefill_tokens),
        float(mixed),
        prefill * float(batch.decode_context_tokens),
        0.0,  # serving_engine_frac: the engine part's time, which needs the coefficients
        float(batch.num_prefill_seqs) if batch.num_prefill_tokens else 0.0,
    )


def _check_coefficients(name: str, coefficients: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(coefficients) - set(TERMS))
    if unknown:
        raise ValueError(f"{name} has unknown terms {unknown}; allowed: {', '.join(TERMS)}")
    out = {term: float(coefficients.get(term, 0.0)) for term in TERMS}
    for term, value in out.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}[{term!r}]={value!r} must be a finite number of seconds")
    return out


class ProfiledLatencyModel:
    """Step time = a linear model over StepBatch features, fitted on a real engine.

    ``coefficients`` maps each term of TERMS to seconds per unit (missing terms are 0). When
    ``large_batch_coefficients`` is given, steps with at least ``large_batch_min_decode_seqs``
    decoding sequences use it instead (published profiles fit small and large decode batches
    apart). A separate ``prefill_step_s`` exists because published fits price prefill-only
    and decode-only steps with different constants. The ``serving_*`` terms price what the
    serving path adds to each engine step (engine-core IPC and the frontend's per-request
    output processing, measured through AsyncLLM); they are 0 in engine-only profiles.
    ``serving_engine_frac`` scales the engine part (every term not named ``serving_*``) by
    ``1 + frac``: on a CPU the serving processes take CPU time from the model's core in
    proportion to its step. ``mixed_*`` terms price decodes that share a step with prefill
    tokens, where a CPU attention kernel handles them with the prefill's query tiles.
    Prices a step (StepLatencyModel) and predicts a request (LatencyModel).

    ``ingress_s`` and ``egress_s`` are per request, not per step: the serving path from the
    control plane into the engine core's scheduler (input processing, IPC; the engine core
    takes a request in only between steps, which the replica models on its own) and from
    the engine core's output back to the control plane. The simulated replica delays a
    request's admission by the first and every report to the control plane by the second
    (0 in engine-only profiles)."""

    def __init__(
        self,
        model: str,
        hardware: str,
        coefficients: Mapping[str, float],
        engine: str = "vllm",
        engine_version: str = "",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        large_batch_coefficients: Mapping[str, float] | None = None,
        large_batch_min_decode_seqs: int | None = None,
        max_num_batched_tokens: int = 8192,
        provenance: Mapping[str, Any] | None = None,
        ingress_s: float = 0.0,
        egress_s: float = 0.0,
    ) -> None:
        check_positive("tensor_parallel_size", tensor_parallel_size, integer=True)
        for name, value in (("ingress_s", ingress_s), ("egress_s", egress_s)):
            check_non_negative(name, value)
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number of seconds")
        check_positive("pipeline_parallel_size", pipeline_parallel_size, integer=True)
        check_positive("max_num_batched_tokens", max_num_batched_tokens, integer=True)
        if (large_batch_coefficients is None) != (large_batch_min_decode_seqs is None):
            raise ValueError(
                "large_batch_coefficients and large_batch_min_decode_seqs go together; "
                f"got {large_batch_coefficients!r} and {large_batch_min_decode_seqs!r}"
            )
        if large_batch_min_decode_seqs is not None:
            check_positive("large_batch_min_decode_seqs", large_batch_min_decode_seqs, integer=True)
        self.model = model
        self.hardware = hardware
        self.engine = engine
        self.engine_version = str(engine_version)
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.coefficients = _check_coefficients("coefficients", coefficients)
        self.large_batch_coefficients = (
            None
            if large_batch_coefficients is None
            else _check_coefficients("large_batch_coefficients", large_batch_coefficients)
        )
        self.large_batch_min_decode_seqs = large_batch_min_decode_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.ingress_s = float(ingress_s)
        self.egress_s = float(egress_s)
        self.provenance = dict(provenance or {})
        self._small = tuple(self.coefficients[t] for t in TERMS)
        self._large = (
            None
            if self.large_batch_coefficients is None
            else tuple(self.large_batch_coefficients[t] for t in TERMS)
        )

    def _terms(self, num_decode_seqs: int) -> tuple[float, ...]:
        limit = self.large_batch_min_decode_seqs
        if self._large is not None and limit is not None and num_decode_seqs >= limit:
            return self._large
        return self._small

    def step_time_s(self, batch: StepBatch) -> float:
        if batch.num_prefill_tokens == 0 and batch.num_decode_seqs == 0:
            return 0.0
        (step, pstep, ptok, psq, pctx, dseq, dctx, sstep, sseq, tsq, sptok, mseq, mctx,
         frac, spseq) = self._terms(batch.num_decode_seqs)
        engine_s = step + dseq * batch.num_decode_seqs + dctx * batch.decode_context_tokens
        if tsq:
            engine_s += tsq * float(batch.num_prefill_tokens + batch.num_decode_seqs) ** 2
        serving_s = sstep
        if sseq:
            serving_s += sseq * (batch.num_decode_seqs + batch.num_prefill_seqs)
        if batch.num_prefill_tokens:
            engine_s += (
                pstep
                + ptok * batch.num_prefill_tokens
                + psq * batch.sum_sq_prefill_tokens
                + pctx * batch.prefill_context_tokens
                + mseq * batch.num_decode_seqs
                + mctx * batch.decode_context_tokens
            )
            if sptok:
                serving_s += sptok * batch.num_prefill_tokens
            if spseq:
                serving_s += spseq * batch.num_prefill_seqs
        return max(0.0, engine_s * (1.0 + frac) + serving_s)

    def decode_step_times_s(
        self, num_decode_seqs: int, context_tokens: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """Times of pure decode steps of ``num_decode_seqs`` sequences, one per context value."""
        a, b = self._decode_terms(num_decode_seqs)
        times = a + b * np.asarray(context_tokens, np.float64)
        return np.maximum(times, 0.0)

    def _decode_terms(self, num_decode_seqs: int) -> tuple[float, float]:
        """(fixed, per context token) seconds of a pure decode step of ``num_decode_seqs``."""
        step, _, _, _, _, dseq, dctx, sstep, sseq, tsq, _, _, _, frac, _ = self._terms(
            num_decode_seqs
        )
        engine_s = step + dseq * num_decode_seqs + tsq * num_decode_seqs**2
        fixed = engine_s * (1.0 + frac) + sstep + sseq * num_decode_seqs
        return fixed, dctx * (1.0 + frac)

    def decode_step_linear_s(
        self, num_decode_seqs: int, first_context_tokens: int, context_increment_tokens: int
    ) -> tuple[float, float] | None:
        """(a, b) with pure decode step i (from 0) costing exactly a + b*i, when the context
        grows by ``context_increment_tokens`` per step; None where that form does not hold."""
        if num_decode_seqs == 0:
            return None
        fixed, per_token = self._decode_terms(num_decode_seqs)
        first = fixed + per_token * first_context_tokens
        if first < 0.0 or per_token < 0.0:
            return None
        return first, per_token * context_increment_tokens

    def scaled(self, factor: float) -> ProfiledLatencyModel:
        """This profile on an engine ``factor`` times as slow: every step and the serving
        path take ``factor`` times as long (``serving_engine_frac`` is a ratio and stays).
        For an engine whose speed has drifted since it was profiled (a probe measures the
        factor; ``experiments/fidelity.py``)."""
        check_positive("factor", factor)
        if not math.isfinite(factor):
            raise ValueError(f"factor={factor!r} must be a finite number")

        def times(coefficients: Mapping[str, float]) -> dict[str, float]:
            return {
                term: value if term == "serving_engine_frac" else value * factor
                for term, value in coefficients.items()
            }

        data = self.to_dict()
        data["coefficients"] = times(self.coefficients)
        if self.large_batch_coefficients is not None:
            data["large_batch_coefficients"] = times(self.large_batch_coefficients)
        data["ingress_s"] = self.ingress_s * factor
        data["egress_s"] = self.egress_s * factor
        scaled_by = float(self.provenance.get("scaled_by", 1.0)) * factor  # of the measured one
        data["provenance"] = {**self.provenance, "scaled_by": scaled_by}
        return ProfiledLatencyModel.from_dict(data)

    def predict(self, request: RequestView, instance: InstanceView) -> LatencyEstimate:
        estimate = predict_from_steps(self, request, instance, self.max_num_batched_tokens)
        path_s = self.ingress_s + self.egress_s
        if path_s:
            return LatencyEstimate(ttft_s=estimate.ttft_s + path_s, tpot_s=estimate.tpot_s)
        return estimate

    def to_dict(self) -> dict[str, Any]:
        """The profile file's keys (equal to the constructor's arguments)."""
        data: dict[str, Any] = {
            "_target_": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": self.model,
            "hardware": self.hardware,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "coefficients": dict(self.coefficients),
        }
        if self.large_batch_coefficients is not None:
            data["large_batch_coefficients"] = dict(self.large_batch_coefficients)
            data["large_batch_min_decode_seqs"] = self.large_batch_min_decode_seqs
        if self.ingress_s or self.egress_s:
            data["ingress_s"] = self.ingress_s
            data["egress_s"] = self.egress_s
        data["provenance"] = dict(self.provenance)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfiledLatencyModel:
        args = {k: v for k, v in data.items() if k != "_target_"}
        target = data.get("_target_", "cpsim.profiles.ProfiledLatencyModel")
        if target != "cpsim.profiles.ProfiledLatencyModel":
            raise ValueError(f"_target_={target!r}; allowed: cpsim.profiles.ProfiledLatencyModel")
        try:
            return cls(**args)
        except TypeError as err:
            raise ValueError(f"bad profile keys {sorted(args)}: {err}") from None

    def __repr__(self) -> str:
        return (
            f"ProfiledLatencyModel({self.model!r}, {self.hardware!r}, "
            f"tp={self.tensor_parallel_size}, pp={self.pipeline_parallel_size})"
        )


def predict_from_steps(
    model: StepLatencyModel,
    request: RequestView,
    instance: InstanceView,
    max_num_batched_tokens: int = 8192,
) -> LatencyEstimate:
    """A request's latency from a step-pricing model. TTFT: the prefill work queued ahead
    (``pending_prefill_tokens``) then this prompt, in budget-sized chunks, each step alongside
    the instance's ``num_running`` decodes; TPOT: a decode step of ``num_running + 1``
    sequences at this request's mid-generation context."""
    running = instance.outstanding  # exact in-flight count when fresher than the scrape
    context = request.num_prompt_tokens + request.max_tokens // 2
    decode_context = running * context
    chunk = max_num_batched_tokens
    ttft_s = 0.0
    work = ((instance.pending_prefill_tokens, False), (request.num_prompt_tokens, True))
    for tokens, own in work:
        done = 0
        while done < tokens or (own and done == 0):
            num = max(1, min(tokens - done, chunk))
            context_before = done if own else 0
            ttft_s += model.step_time_s(
                StepBatch(num, num * num, context_before, 1, running, decode_context)
            )
            done += num
    tpot_s = model.step_time_s(
        StepBatch(num_decode_seqs=running + 1, decode_context_tokens=(running + 1) * context)
    )
    return LatencyEstimate(ttft_s=ttft_s, tpot_s=tpot_s)


def available_profiles(directory: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_profile(name_or_path: str | Path, directory: Path = PROFILE_DIR) -> ProfiledLatencyModel:
    """A profile by short name (``vllm-opt-13b-a100-80gb-tp1``) from conf/profile/, or a path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        path = directory / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown profile {str(name_or_path)!r}; allowed: "
                f"{', '.join(available_profiles(directory))}"
            )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"profile file {path} must hold a mapping, got {type(data).__name__}")
    return ProfiledLatencyModel.from_dict(data)


def save_profile(model: ProfiledLatencyModel, path: str | Path) -> Path:
    """Write a profile file that ``load_profile`` and Hydra's instantiate read back."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(model.to_dict(), sort_keys=False))
    return out
