"""Fits the analytical step model's calibrations (cpsim/calibration.py) on public GPU
measurements, and reports how well a fit on part of them predicts the rest.

    python -m experiments.fit_latency_model            # held-out report, as docs/latency-model.md
    python -m experiments.fit_latency_model --write    # also rewrite cpsim/data/calibrations/

Three public sources, each for what it measures (data/published/*/README.md):

- Vidur's per-operator kernel timings (microsoft/vidur, A100 and H100): the HBM bandwidth a
  GPU achieves on weight reads, from the linear layers' time at one token;
- Vidur's all-reduce timings (DGX A100 / DGX H100): latency and bandwidth by TP degree;
- Vidur's send/recv timings (the same nodes): one GPU to another within a node (NVLink) and
  across two nodes (their network), the hand-off between pipeline stages;
- DeepEP's published low-latency dispatch and combine timings (H800, EP 8-256): the MoE
  all-to-all's latency and bandwidth by EP degree, for the H100 calibration;
- Splitwise's whole-step timings of vLLM (Mutinifni/splitwise-sim, DGX A100 / DGX H100,
  Llama-2-70B at TP 2/4/8 and BLOOM-176B at TP8): prefill of a batch of prompts and the
  decode step at a batch size, from which the engine's FLOP fraction and fixed costs come.

Held-out check: the engine terms are fitted on Llama-2-70B at TP 2 and 4 only and predict
Llama-2-70B at TP8 and BLOOM-176B (another model) at TP8; the bandwidth fraction is fitted
on three of Vidur's models at TP 1-4 and predicts the others and TP8; the send/recv cost is
fitted on messages up to 1 MiB (a decode step's hand-off) and predicts the larger ones (a
prefill's); the all-to-all is fitted on EP 8-64 and prices EP 128 and 256 from EP 64's. The
shipped
calibrations are then fitted on all of Splitwise's steps (``--write``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cpsim.calibration import Calibration, LinkCost, load_calibration
from cpsim.gpus import load_gpu_spec
from cpsim.latency import StepBatch
from cpsim.models import load_model_spec
from cpsim.roofline import RooflineLatencyModel

ROOT = Path(__file__).resolve().parents[1]
VIDUR = ROOT / "data" / "published" / "vidur-profiling"
DEEPEP = ROOT / "data" / "published" / "deepep-low-latency" / "low_latency.csv"
SPLITWISE = ROOT / "data" / "published" / "splitwise-perf-model" / "perf_model.csv"
OUT = ROOT / "cpsim" / "data" / "calibrations"

# Splitwise's hardware names -> (our GPU spec, Vidur's folders, other GPUs it applies to)
GPUS = {
    "a100-80gb": ("A100-80GB", "a100", "a100_dgx", ("A100-40GB",)),
    "h100-80gb": ("H100-SXM", "h100", "h100_dgx", ("H200",)),
}
ALL_TO_ALL_GPUS = ("h100-80gb",)  # DeepEP measured H800s: an H100 with less NVLink
# DeepEP's test setting: tokens per GPU, experts per token, and bytes per token and expert
DEEPEP_TOKENS, DEEPEP_TOPK = 128, 8
DEEPEP_BYTES = {"dispatch": 7168 + 7168 / 128 * 4 + 16, "combine": 7168 * 2}  # FP8, BF16
ALL_TO_ALL_FIT_EP = (8, 16, 32, 64)
MODELS = {"llama2-70b": "llama-2-70b", "bloom-176b": "bloom-176b"}
# The linear layers and the small kernels around them, one decoder layer (Vidur's mlp.csv)
LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
BANDWIDTH_FIT_MODELS = ("Llama-2-7b-hf", "CodeLlama-34b-Instruct-hf", "internlm-20b")
ENGINE_FIT = {"model": "llama2-70b", "tp": (2, 4)}

# the engine terms least_squares fits: (name, start, low, high)
ENGINE_TERMS = (
    ("flop_fraction", 0.6, 0.05, 1.0),
    ("flop_fraction_tp_exponent", 0.2, 0.0, 1.5),
    ("overlap_exponent", 2.0, 1.0, 8.0),
    ("layer_s", 50e-6, 0.0, 1e-3),
    ("layer_s_per_tp_doubling", 0.0, 0.0, 1e-3),
    ("prefill_step_s", 5e-3, 0.0, 0.2),
    ("decode_step_s", 5e-3, 0.0, 0.2),
    ("seq_s", 1e-4, 0.0, 5e-3),
    ("token_sq_factor", 1.0, 0.0, 1e3),
)


# ---------------------------------------------------------------------- the GPU's terms
def vidur_layer_times(gpu_folder: str) -> pd.DataFrame:
    """One row per (model, tp, tokens): the median time (s) of a decoder layer's linear and
    small kernels, and the bytes of weights each GPU reads for them."""
    rows = []
    for path in sorted((VIDUR / "compute" / gpu_folder).glob("*/*/mlp.csv")):
        d = pd.read_csv(path)
        first = d.iloc[0]
        h, e = float(first.n_embd), float(first.n_expanded_embd)
        head_dim = h / float(first.n_head)
        qkv = h * (float(first.n_head) + 2.0 * float(first.n_kv_head)) * head_dim
        mlp = (3.0 if bool(first.use_gated_mlp) else 2.0) * h * e
        params = qkv + h * h + mlp
        d["time_s"] = sum(d[f"time_stats.{op}.median"] for op in LAYER_OPS) / 1e3
        g = d.groupby(["num_tensor_parallel_workers", "num_tokens"])["time_s"].median()
        for (tp, tokens), t in g.items():
            rows.append(
                {
                    "model": path.parent.name,
                    "tp": int(tp),
                    "tokens": int(tokens),
                    "time_s": float(t),
                    "weight_bytes": 2.0 * params / int(tp),
                }
            )
    return pd.DataFrame(rows)


def fit_bandwidth(layers: pd.DataFrame, peak_bytes_s: float) -> tuple[float, float]:
    """(bandwidth fraction, kernel floor per layer in s) from one-token layer times:
    time = floor + weight bytes / (fraction x peak), least squares on relative error."""
    one = layers[layers.tokens == 1]
    a = np.vstack([np.ones(len(one)), one.weight_bytes / peak_bytes_s]).T
    w = 1.0 / one.time_s.to_numpy()
    (floor, inverse), *_ = np.linalg.lstsq(a * w[:, None], one.time_s.to_numpy() * w, rcond=None)
    return 1.0 / float(inverse), float(floor)


def fit_link(times: pd.Series) -> LinkCost:
    """Latency and bandwidth from times (s) indexed by message bytes, least squares on
    relative error."""
    a = np.vstack([np.ones(len(times)), times.index.to_numpy(dtype=float)]).T
    w = 1.0 / times.to_numpy()
    (latency, per_byte), *_ = np.linalg.lstsq(a * w[:, None], times.to_numpy() * w, rcond=None)
    return LinkCost(max(0.0, float(latency)), 1.0 / float(per_byte))


def _median_times(d: pd.DataFrame, column: str) -> pd.Series:
    """Median time (s) by message size over the repeated sizes, up to 64 MiB."""
    d = d[d["size"] <= 64 * 2**20]
    return d.groupby("size")[column].median() / 1e3


def fit_all_reduce(network_folder: str) -> dict[int, LinkCost]:
    """Latency and bandwidth per TP degree within one node, over messages up to 64 MiB."""
    d = pd.read_csv(VIDUR / "network" / network_folder / "all_reduce.csv")
    d = d[d.devices_per_node == d.num_workers]
    return {
        int(tp): fit_link(_median_times(group, "time_stats.all_reduce.median"))
        for tp, group in d.groupby("num_workers")
    }


def send_recv_times(network_folder: str) -> dict[str, pd.Series]:
    """One GPU sending to another: both on one node, and on two nodes."""
    d = pd.read_csv(VIDUR / "network" / network_folder / "send_recv.csv")
    paths = {"intra_node": d.devices_per_node == 2, "inter_node": d.devices_per_node == 1}
    column = "time_stats.send_recv.median"
    return {path: _median_times(d[rows], column) for path, rows in paths.items()}


def fit_send_recv(network_folder: str) -> dict[str, LinkCost]:
    return {path: fit_link(t) for path, t in send_recv_times(network_folder).items()}


def send_recv_report(network_folder: str) -> pd.DataFrame:
    """Per path: the fit on all messages and its |error|; the fit on messages up to 1 MiB (a
    decode step's hand-off, tokens x hidden x 2 bytes) and its |error| on the larger ones (a
    prefill chunk's)."""
    rows = []
    for path, t in send_recv_times(network_folder).items():
        full, held = fit_link(t), fit_link(t[t.index <= 2**20])
        large = t[t.index > 2**20]
        in_err = ((full.latency_s + t.index / full.bytes_per_s) / t - 1).abs() * 100
        out_err = ((held.latency_s + large.index / held.bytes_per_s) / large - 1).abs() * 100
        rows.append(
            {
                "path": path,
                "latency_us": round(full.latency_s * 1e6, 1),
                "GB_per_s": round(full.bytes_per_s / 1e9, 1),
                "median_abs_pct": round(float(in_err.median()), 1),
                "held_out_n": len(large),
                "held_out_median_abs_pct": round(float(out_err.median()), 1),
                "held_out_p90_abs_pct": round(float(out_err.quantile(0.9)), 1),
            }
        )
    return pd.DataFrame(rows)


def deepep_times() -> pd.DataFrame:
    """DeepEP's table with the bytes one GPU sends per kernel and the time in s."""
    d = pd.read_csv(DEEPEP)
    d["bytes"] = d.kernel.map(DEEPEP_BYTES) * DEEPEP_TOKENS * DEEPEP_TOPK
    d["time_s"] = d.latency_us / 1e6
    return d


def fit_all_to_all(eps: tuple[int, ...] | None = None) -> dict[int, LinkCost]:
    """Per EP degree, the line through dispatch's (bytes, time) and combine's: a latency and
    a bandwidth (combine also reduces, so this counts it as a larger message)."""
    d = deepep_times()
    out = {}
    for ep, group in d.groupby("ep"):
        if eps is not None and ep not in eps:
            continue
        k = group.set_index("kernel")
        per_byte = (k.time_s["combine"] - k.time_s["dispatch"]) / (
            k.bytes["combine"] - k.bytes["dispatch"]
        )
        latency = k.time_s["dispatch"] - k.bytes["dispatch"] * per_byte
        out[int(ep)] = LinkCost(max(0.0, float(latency)), 1.0 / float(per_byte))
    return out


def all_to_all_report() -> pd.DataFrame:
    """The fit per EP degree, and DeepEP's times against the calibration fitted on EP 8-64
    (EP 128 and 256 priced at EP 64's, as Calibration.all_to_all_at does)."""
    held = replace(load_calibration("vllm-h100-sxm"), all_to_all=fit_all_to_all(ALL_TO_ALL_FIT_EP))
    fitted = fit_all_to_all()
    rows = []
    for r in deepep_times().itertuples():
        cost = held.all_to_all_at(int(r.ep))
        assert cost is not None
        rows.append(
            {
                "ep": r.ep,
                "kernel": r.kernel,
                "held_out": r.ep not in ALL_TO_ALL_FIT_EP,
                "measured_us": r.latency_us,
                "predicted_us": round(cost.time_s(r.bytes) * 1e6, 1),
                "err_pct": round((cost.time_s(r.bytes) / r.time_s - 1) * 100, 1),
                "latency_us": round(fitted[r.ep].latency_s * 1e6, 1),
                "GB_per_s": round(fitted[r.ep].bytes_per_s / 1e9, 1),
            }
        )
    return pd.DataFrame(rows).sort_values(["ep", "kernel"])


# ---------------------------------------------------------------------- the engine's terms
def splitwise_steps() -> pd.DataFrame:
    """One row per measured step: Splitwise's median over repeats of a prefill of ``bs``
    prompts of ``prompt`` tokens (its prompt_time) and of a decode step of ``bs`` sequences
    (its token_time, the mean over ``tokens`` decode steps: context prompt + tokens / 2).
    Dropped: TP2 at batch 64, where both times fall below batch 32's (70B's 64 prompts
    do not fit TP2's KV cache at once, so the engine did not run that batch)."""
    d = pd.read_csv(SPLITWISE)
    d = d[d.hardware.isin(GPUS)]
    keys = ["model", "hardware", "tensor_parallel", "prompt_size", "batch_size", "token_size"]
    g = d.groupby(keys)[["prompt_time", "token_time"]].median().reset_index()
    g = g[~((g.tensor_parallel == 2) & (g.batch_size == 64))]
    rows = []
    for r in g.itertuples():
        common = {"model": r.model, "gpu": r.hardware, "tp": int(r.tensor_parallel)}
        bs, prompt, tokens = int(r.batch_size), int(r.prompt_size), int(r.token_size)
        rows.append(
            common
            | {
                "phase": "prefill",
                "batch": StepBatch(bs * prompt, bs * prompt**2, 0, bs),
                "measured_s": r.prompt_time / 1e3,
                "case": f"prefill {bs}x{prompt}",
            }
        )
        rows.append(
            common
            | {
                "phase": "decode",
                "batch": StepBatch(
                    num_decode_seqs=bs, decode_context_tokens=bs * (prompt + tokens // 2)
                ),
                "measured_s": r.token_time / 1e3,
                "case": f"decode {bs}x{prompt + tokens // 2}",
            }
        )
    out = pd.DataFrame(rows)
    return out.drop_duplicates(["model", "gpu", "tp", "case"]).reset_index(drop=True)


def predict(steps: pd.DataFrame, cal: Calibration) -> np.ndarray:
    models: dict[tuple[str, int], RooflineLatencyModel] = {}
    out = np.empty(len(steps))
    gpu = load_gpu_spec(cal.gpu)
    for i, (model, tp, batch) in enumerate(zip(steps.model, steps.tp, steps.batch, strict=True)):
        key = (model, tp)
        if key not in models:
            models[key] = RooflineLatencyModel(MODELS[model], gpu, tp, calibration=cal)
        out[i] = models[key].step_time_s(batch)
    return out


def fit_engine(steps: pd.DataFrame, base: Calibration) -> Calibration:
    """The engine terms minimising the relative (log) error over ``steps``."""
    from scipy.optimize import least_squares  # the fit's only use of scipy

    names = [t[0] for t in ENGINE_TERMS]
    measured = steps.measured_s.to_numpy()

    def calibration(theta: np.ndarray) -> Calibration:
        return replace(base, **{n: float(v) for n, v in zip(names, theta, strict=True)})

    def residuals(theta: np.ndarray) -> np.ndarray:
        return np.log(predict(steps, calibration(theta)) / measured)

    start = [t[1] for t in ENGINE_TERMS]
    bounds = ([t[2] for t in ENGINE_TERMS], [t[3] for t in ENGINE_TERMS])
    result = least_squares(residuals, start, bounds=bounds, x_scale="jac")
    return calibration(result.x)


# ---------------------------------------------------------------------- reports
def errors(steps: pd.DataFrame, cal: Calibration) -> pd.DataFrame:
    out = steps.drop(columns="batch").copy()
    out["predicted_s"] = predict(steps, cal)
    out["error"] = out.predicted_s / out.measured_s - 1.0
    return out


def summary(err: pd.DataFrame) -> pd.DataFrame:
    """Median and worst |error| and the median signed error per model, TP and phase."""
    g = err.groupby(["model", "tp", "phase"]).error
    return pd.DataFrame(
        {
            "n": g.size(),
            "median_abs_pct": g.apply(lambda e: 100 * float(np.median(np.abs(e)))),
            "median_pct": g.apply(lambda e: 100 * float(np.median(e))),
            "max_abs_pct": g.apply(lambda e: 100 * float(np.max(np.abs(e)))),
        }
    ).round(1)


def tp_ratios(err: pd.DataFrame) -> pd.DataFrame:
    """Per step case: measured and predicted time ratio between TP degrees (TP4/TP2,
    TP8/TP4), and the ratio's relative error; median per phase."""
    rows = []
    for (model, phase), g in err.groupby(["model", "phase"]):
        by_tp = g.pivot_table(index="case", columns="tp", values=["measured_s", "predicted_s"])
        tps = sorted(g.tp.unique())
        for lo, hi in itertools.pairwise(tps):
            both = by_tp.dropna(subset=[("measured_s", lo), ("measured_s", hi)])
            real = both["measured_s"][hi] / both["measured_s"][lo]
            sim = both["predicted_s"][hi] / both["predicted_s"][lo]
            rows.append(
                {
                    "model": model,
                    "phase": phase,
                    "ratio": f"TP{hi}/TP{lo}",
                    "n": len(both),
                    "measured": round(float(real.median()), 3),
                    "predicted": round(float(sim.median()), 3),
                    "median_abs_err_pct": round(100 * float((sim / real - 1).abs().median()), 1),
                }
            )
    return pd.DataFrame(rows)


PROFILE_GRID = (
    *(StepBatch(num_decode_seqs=bs, decode_context_tokens=bs * 600) for bs in (1, 8, 32, 128)),
    *(StepBatch(n, n * n, 0, 1) for n in (128, 512, 2048)),
)


def profiles_against_model() -> pd.DataFrame:
    """Every shipped GPU profile (conf/profile/) against the analytical model for the same
    model, GPU and TP: the model's step time over the profile's on decode steps of 1-128
    sequences (600 tokens of context each) and prefills of 128-2048 tokens."""
    from cpsim.gpus import available_gpus
    from cpsim.models import available_models
    from cpsim.profiles import PROFILE_DIR, load_profile

    by_name = {load_model_spec(m).name.lower(): m for m in available_models()}
    rows = []
    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        profile = load_profile(path.stem)
        model = by_name.get(profile.model.lower())
        if model is None or profile.hardware.lower() not in available_gpus():
            continue
        analytical = RooflineLatencyModel(
            model, profile.hardware, profile.tensor_parallel_size, profile.pipeline_parallel_size
        )
        for batch in PROFILE_GRID:
            phase = "decode" if batch.num_prefill_tokens == 0 else "prefill"
            ratio = analytical.step_time_s(batch) / profile.step_time_s(batch)
            rows.append({"profile": path.stem, "phase": phase, "ratio": ratio})
    d = pd.DataFrame(rows)
    return (
        d.groupby(["profile", "phase"])
        .ratio.agg(["min", "median", "max"])
        .rename(columns=lambda c: f"model/profile {c}")
        .round(2)
    )


def gpu_terms(gpu_key: str) -> tuple[Calibration, dict[str, float]]:
    """A calibration with the GPU's measured terms and placeholder engine terms, and the
    bandwidth fit's own held-out errors."""
    spec_name, vidur_gpu, network, applies_to = GPUS[gpu_key]
    spec = load_gpu_spec(spec_name)
    layers = vidur_layer_times(vidur_gpu)
    held_in = layers.model.isin(BANDWIDTH_FIT_MODELS) & (layers.tp <= 4)
    fraction, floor = fit_bandwidth(layers[held_in], spec.memory_bandwidth_bytes_s)
    held_out = layers[~held_in & (layers.tokens == 1)]
    predicted = floor + held_out.weight_bytes / (fraction * spec.memory_bandwidth_bytes_s)
    bw_err = (predicted / held_out.time_s - 1).abs()
    base = Calibration(
        name=f"vllm-{spec_name.lower()}",
        gpu=spec_name,
        engine="vLLM as profiled by Splitwise (2023, fp16, DGX)",
        bandwidth_fraction=round(fraction, 4),
        **{t[0]: t[1] for t in ENGINE_TERMS},
        all_reduce=fit_all_reduce(network),
        send_recv=fit_send_recv(network),
        all_to_all=fit_all_to_all() if gpu_key in ALL_TO_ALL_GPUS else {},
        applies_to=applies_to,
    )
    notes = {
        "kernel_floor_s_per_layer": floor,
        "bandwidth_heldout_median_abs_pct": 100 * float(bw_err.median()),
        "bandwidth_heldout_n": float(len(held_out)),
    }
    return base, notes


def _link_table(table: dict[Any, LinkCost]) -> dict[str, dict[str, float]]:
    """Link costs by group size or path, as the calibration file holds them."""
    return {
        str(k): {
            "latency_s": float(f"{c.latency_s:.6g}"),
            "bytes_per_s": float(f"{c.bytes_per_s:.6g}"),
        }
        for k, c in table.items()
    }


def calibration_json(cal: Calibration, fit: dict[str, object]) -> dict[str, object]:
    return {
        "name": cal.name,
        "gpu": cal.gpu,
        "engine": cal.engine,
        "applies_to": list(cal.applies_to),
        **{t[0]: float(f"{getattr(cal, t[0]):.6g}") for t in ENGINE_TERMS},
        "bandwidth_fraction": cal.bandwidth_fraction,
        "all_reduce": _link_table(cal.all_reduce),
        "send_recv": _link_table(cal.send_recv),
        "all_to_all": _link_table(cal.all_to_all),
        "source": cal.source,
        "fit": fit,
    }


SOURCE = (
    "Fitted by `python -m experiments.fit_latency_model --write` on public measurements: "
    "bandwidth_fraction on Vidur's per-operator kernel timings (microsoft/vidur, MIT), "
    "all_reduce and send_recv on Vidur's DGX collective timings, the engine terms on "
    "Splitwise's vLLM step timings (Mutinifni/splitwise-sim data/perf_model.csv, MIT), "
    "all_to_all (where present) on DeepEP's published low-latency dispatch and combine "
    "timings on H800 (deepseek-ai/DeepEP, MIT); see data/published/ and docs/latency-model.md"
)


def run(write: bool) -> dict[str, pd.DataFrame]:
    steps = splitwise_steps()
    tables: dict[str, list[pd.DataFrame]] = {
        "held_out": [],
        "ratios": [],
        "in_sample": [],
        "send_recv": [],
    }
    for gpu_key in GPUS:
        base, notes = gpu_terms(gpu_key)
        base = replace(base, source=SOURCE)
        mine = steps[steps.gpu == gpu_key]
        fit_rows = (mine.model == ENGINE_FIT["model"]) & mine.tp.isin(ENGINE_FIT["tp"])
        held = fit_engine(mine[fit_rows], base)
        err = errors(mine, held)
        err["held_out"] = ~fit_rows.to_numpy()
        tables["held_out"].append(summary(err).assign(gpu=base.gpu))
        tables["ratios"].append(tp_ratios(err).assign(gpu=base.gpu))
        shipped = fit_engine(mine, base)
        tables["in_sample"].append(summary(errors(mine, shipped)).assign(gpu=base.gpu))
        tables["send_recv"].append(send_recv_report(GPUS[gpu_key][2]).assign(gpu=base.gpu))
        if write:
            fit = {
                "steps": len(mine),
                **{k: round(v, 6) for k, v in notes.items()},
            }
            OUT.mkdir(parents=True, exist_ok=True)
            text = json.dumps(calibration_json(shipped, fit), indent=1) + "\n"
            (OUT / f"{shipped.name}.json").write_text(text)
    out = {k: pd.concat(v) for k, v in tables.items()}
    out["all_to_all"] = all_to_all_report()
    out["profiles"] = profiles_against_model()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the shipped calibrations")
    args = parser.parse_args(argv)
    tables = run(args.write)
    pd.set_option("display.width", 160)
    for name, table in tables.items():
        print(f"== {name}")
        print(table.to_string())
    held = tables["held_out"].reset_index()
    out = held[(held.tp == 8) | (held.model != ENGINE_FIT["model"])]
    median = float(out.median_abs_pct.median())
    print(f"held-out: median of the per-row median |error| at TP8 and on BLOOM: {median:.1f} %")


if __name__ == "__main__":
    main()
