"""Measures a vLLM engine's step times over controlled batches and fits a ProfiledLatencyModel.

    python -m backends.vllm.profiler --model-dir conf/vllm_model/tiny-llama \\
        --out conf/profile/vllm-cpu-tiny-llama-tp1.yaml [--quick]

Two measurements, each in a fresh child process: the engine step (``LLMEngine`` in-process,
each ``step()`` one scheduler iteration, timed alone) over prefill, decode, mixed and
cached-context batches; then the serving path (ControlPlaneManager over AsyncLLMBackend, the
engine core in its own process) on decode batches, whose extra time per step becomes the
``serving_*`` terms. Samples during which other processes used the CPU are discarded; each
point is the median of its repeats. The measurements are in profile_engine (in-process steps),
profile_serving and profile_live (live Poisson calibration, whose raw steps are kept beside
the profile as ``<out>.live.json``); the grid and host checks in profile_measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from backends.vllm.engine_args import DEFAULT_ENV, TINY_MODEL_DIR, TINY_VOCAB_SIZE, engine_args_for
from backends.vllm.profile_engine import measure_engine
from backends.vllm.profile_measure import (
    ProfileGrid,
    engine_name_version,
    hardware_info,
    wait_for_quiet,
    worker_thread_env,
)
from backends.vllm.profile_path import PATH_KIND, fit_path
from backends.vllm.profile_serving import measure_serving
from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample, fit_terms, relative_errors
from cpsim.profiles import TERMS, ProfiledLatencyModel, load_profile, save_profile

ENGINE_TERMS = (*TERMS[:7], "step_token_sq_s", "mixed_decode_seq_s",
                "mixed_decode_context_token_s")
SERVING_TERMS = ("serving_step_s", "serving_seq_s", "serving_prefill_token_s",
                 "serving_engine_frac", "serving_prefill_seq_s")


def _child(phase: str, argv: list[str], work: Path, engine_env: list[str]) -> list[StepSample]:
    """Run one measurement in a fresh interpreter (vLLM's process mode is fixed at import)."""
    out = work / f"{phase}.json"
    cmd = [sys.executable, "-m", "backends.vllm.profiler", *argv, "--measure", phase,
           "--samples-out", str(out)]
    env = {**DEFAULT_ENV, **os.environ, **dict(e.split("=", 1) for e in engine_env)}
    if phase == "engine":  # the served worker's threads, not every core of the machine
        env.update(worker_thread_env(env))
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[2])
    return [StepSample.from_dict(d) for d in json.loads(out.read_text())]


def live_file(path: Path) -> Path:
    """Where the live calibration's raw runs are kept, beside ``path`` (LiveRun.to_dict)."""
    return path.with_name(path.name.rsplit(".", 1)[0] + ".live.json")


def fit_profile(engine: list[StepSample], serving: list[StepSample], info: dict[str, Any]
                ) -> ProfiledLatencyModel:
    """Engine terms from the in-process steps; serving terms from what AsyncLLM adds to a
    step; the serving path of a request (ingress_s, egress_s) from its path samples."""
    path = [s for s in serving if s.kind.startswith(PATH_KIND)]
    serving = [s for s in serving if not s.kind.startswith(PATH_KIND)]
    ingress_s, egress_s, path_report = fit_path(path)
    engine_fit = fit_terms(engine, ENGINE_TERMS, signed=("prefill_step_s",))
    coefficients = dict(engine_fit.coefficients)
    report: dict[str, Any] = {"engine_step": engine_fit.report()}
    decode = [s for s in serving if s.kind == "serving_decode"]
    if decode:  # lone-prompt TTFTs price the serving path's prefill tokens
        serving_fit = fit_terms(serving, SERVING_TERMS, fixed=coefficients)
        coefficients.update({t: serving_fit.coefficients[t] for t in SERVING_TERMS})
        report["serving_decode"] = serving_fit.report()
    model = ProfiledLatencyModel(info["model"], info["hardware"], coefficients)
    engine_only = ProfiledLatencyModel("e", "e", engine_fit.coefficients)
    report["serving_samples"] = [
        {"kind": s.kind, "batch_seqs": s.batch.num_decode_seqs + s.batch.num_prefill_seqs,
         "prefill_tokens": s.batch.num_prefill_tokens, "measured_ms": round(s.time_s * 1e3, 3),
         "engine_step_ms": round(engine_only.step_time_s(s.batch) * 1e3, 3),
         "profile_ms": round(model.step_time_s(s.batch) * 1e3, 3)} for s in serving]
    ttft = [s for s in serving if s.kind == "serving_ttft"]
    if ttft:
        report["serving_ttft_offset_ms"] = round(1e3 * statistics.median(
            s.time_s - model.step_time_s(s.batch) for s in ttft), 3)
    if path_report:
        report["serving_path"] = path_report
    rel = relative_errors(model, engine + decode)
    report["profile_max_rel_error"] = round(float(np.max(np.abs(rel))), 4)
    info["fit"] = report
    info["samples"] = [[s.kind, round(s.time_s * 1e3, 4), *s.to_dict()["batch"]]
                       for s in engine + serving + path]
    return ProfiledLatencyModel(
        info["model"], info["hardware"], coefficients, engine=info["engine"],
        engine_version=info["engine_version"], tensor_parallel_size=info["tp"],
        max_num_batched_tokens=info["max_num_batched_tokens"], provenance=info["provenance"]
        | {"fit": report, "samples_ms": info["samples"]}, ingress_s=ingress_s, egress_s=egress_s)


def refit(source: Path, out: Path) -> Path:
    """Fit again from the samples a profile file keeps (after the model's terms changed)."""
    old = load_profile(source)
    prov = dict(old.provenance)
    samples = [StepSample(k, StepBatch(*batch), t_ms / 1e3) for k, t_ms, *batch in
               prov.pop("samples_ms")]
    prov.pop("fit", None)
    info = {"model": old.model, "hardware": old.hardware, "engine": old.engine,
            "engine_version": old.engine_version, "tp": old.tensor_parallel_size,
            "max_num_batched_tokens": old.max_num_batched_tokens,
            "provenance": prov | {"refit_from": str(source), "refit_command":
                                  f"python -m backends.vllm.profiler --refit {source} --out {out}"}}
    engine = [s for s in samples if not s.kind.startswith(("serving", PATH_KIND))]
    serving = [s for s in samples if s.kind.startswith(("serving", PATH_KIND))]
    path = save_profile(fit_profile(engine, serving, info), out)
    print(f"wrote {path}")
    return path


def _model_name(model_dir: str) -> str:
    from cpsim.models import load_model_spec

    try:
        return load_model_spec(Path(model_dir).name).name
    except ValueError:
        return model_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backends.vllm.profiler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=str(TINY_MODEL_DIR))
    p.add_argument("--out", default="conf/profile/vllm-cpu-tiny-llama-tp1.yaml")
    p.add_argument("--quick", action="store_true", help="a tiny grid (tests, smoke runs)")
    p.add_argument("--no-serving", action="store_true", help="skip the AsyncLLM calibration")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--vocab-size", type=int, default=TINY_VOCAB_SIZE)
    p.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the engine processes, e.g. VLLM_CPU_OMP_THREADS_BIND=0 "
                        "(the in-process engine then uses the serving worker's single core)")
    p.add_argument("--max-load", type=float, default=0.7, help="wait for a 1-min load below")
    p.add_argument("--max-wait-s", type=float, default=600.0)
    p.add_argument("--refit", metavar="PROFILE", help="fit again from a profile's saved samples")
    p.add_argument("--measure", choices=("engine", "serving"), help=argparse.SUPPRESS)
    p.add_argument("--samples-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    grid = ProfileGrid.quick() if args.quick else ProfileGrid()
    engine_args = engine_args_for(args.model_dir, {
        "load_format": args.load_format, "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization, "enable_prefix_caching": True})
    if args.measure:
        out = Path(args.samples_out)
        samples = (measure_engine(engine_args, grid, args.vocab_size) if args.measure == "engine"
                   else measure_serving(engine_args, grid, args.vocab_size, live_file(out)))
        Path(args.samples_out).write_text(json.dumps([s.to_dict() for s in samples]))
        return None
    if args.refit:
        return refit(Path(args.refit), Path(args.out))
    load = wait_for_quiet(args.max_load, args.max_wait_s)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        engine = _child("engine", argv, Path(tmp), args.engine_env)
        serving = [] if args.no_serving else _child("serving", argv, Path(tmp), args.engine_env)
        live = live_file(Path(tmp) / "serving.json")
        if live.exists():  # the live runs' raw steps, kept beside the profile for refits
            shutil.copyfile(live, live_file(Path(args.out)))
    hw = hardware_info()
    name, version = engine_name_version()
    hardware = hw.get("gpu") or f"{hw['cpu']} ({hw['cpu_cores']} cores)"
    info = {
        "model": _model_name(engine_args["model"]), "hardware": hardware, "engine": name,
        "engine_version": version, "tp": args.tensor_parallel_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "provenance": {
            "source": f"measured by backends.vllm.profiler on {platform.node()}",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": "python -m backends.vllm.profiler " + " ".join(argv),
            "hardware": hw, "engine_args": engine_args, "grid": asdict(grid),
            "engine_env": args.engine_env,
            "live_runs_file": str(live_file(Path(args.out))),
            "in_process_engine_threads": worker_thread_env(
                {**os.environ, **dict(e.split("=", 1) for e in args.engine_env)}),
            "load_average": load | {"load_after": os.getloadavg()[0]},
            "duration_s": round(time.monotonic() - started, 1),
            "method": "engine terms: relative least squares (non-negative but prefill_step_s) "
                      "over medians of clean in-process LLMEngine.step() timings, the engine "
                      "on the served worker's OpenMP threads (in_process_engine_threads); "
                      "mixed_* terms from steps of a fresh prompt beside running decodes at "
                      "two contexts; serving terms (serving_engine_frac x the engine part, "
                      "plus per step, per sequence, per prefill token and per sequence with "
                      "prefill tokens): the same least "
                      "squares over the client-side decode period (TPOT) of B requests "
                      "decoding together (16-token prompts, and 1024-token prompts) and the "
                      "TTFT of a lone prompt after 1 s idle, and the mean served step period "
                      "by step shape in short Poisson runs (live_rates_rps, seed live_seed, "
                      "ShareGPT lengths; per-step shapes from vLLM's iteration details), "
                      "through ControlPlaneManager + AsyncLLMBackend, with the engine terms "
                      "held fixed; the lone prompts' TTFTs are the engine core's own (first "
                      "token output - taken in, vLLM's request timestamps); ingress_s and "
                      "egress_s: medians of each request's serving path (control plane -> "
                      "engine core scheduler, on requests that found the engine idle; engine "
                      "core first token output -> control plane) over the lone prompts and "
                      "the live runs",
        },
    }
    model = fit_profile(engine, serving, info)
    path = save_profile(model, args.out)
    print(json.dumps(model.provenance["fit"], indent=1))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
