"""Whole MoE steps against public measurements: vLLM's ``benchmark_latency.py`` runs of
Mixtral-8x7B and Mixtral-8x22B (data/published/vllm-moe-benchmark-latency/), each priced by
the analytical model (``RooflineLatencyModel`` with its GPU's calibration) step by step.

    python -m experiments.check_moe_steps

A run of ``benchmark_latency.py`` times one ``generate()`` of a fixed batch: ``batch_size``
prompts of ``input_len`` tokens, each generating exactly ``output_len`` tokens. The engine
(vLLM 0.3-0.4, no chunked prefill) prefills whole prompts up to its token budget a step,
then runs ``output_len - 1`` decode steps of the whole batch, every sequence's context one
token longer each step. Nothing here was fitted on these runs: they check what the
calibrations (fitted on dense Llama and OPT steps) and the MoE terms (the experts a step's
tokens reach, their FLOPs) predict for a model they never saw.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cpsim.latency import StepBatch
from cpsim.roofline import RooflineLatencyModel

DATA = Path(__file__).resolve().parents[1] / "data/published/vllm-moe-benchmark-latency"
#: Each GPU's default calibration (fitted on the 2023 vLLM that Splitwise profiled) and, on
#: A100, the one fitted on vLLM 0.8 (CUDA graphs, custom all-reduce; docs/latency-model.md):
#: these runs' vLLM (0.3-0.4) had CUDA graphs and, from 0.3, its custom all-reduce.
CURRENT = {"A100-80GB": "vllm-0.8-a100"}
RUNS = {  # file: (model, GPU as cpsim names it)
    "vllm_pr2542_mixtral8x7b_h100_tp8.csv": ("mixtral-8x7b", "H100-SXM"),
    "vllm_pr3240_mixtral8x7b_a100_tp2.csv": ("mixtral-8x7b", "A100-80GB"),
    "vllm_pr4002_mixtral8x22b_a100_tp4_tp8.csv": ("mixtral-8x22b", "A100-80GB"),
}


def token_budget(model: RooflineLatencyModel) -> int:
    """vLLM's default prefill budget a step without chunked prefill: max(max_model_len, 2048)."""
    return max(model.model.max_context_tokens, 2048)


def batch_latency_s(
    model: RooflineLatencyModel, batch: int, input_len: int, output_len: int
) -> float:
    """One ``generate()`` of ``batch`` prompts: the prefill steps (as many whole prompts a step
    as the budget holds), then ``output_len - 1`` decode steps of the whole batch."""
    per_step = max(1, token_budget(model) // input_len)
    total = 0.0
    for first in range(0, batch, per_step):
        n = min(per_step, batch - first)
        total += model.step_time_s(
            StepBatch(num_prefill_tokens=n * input_len, sum_sq_prefill_tokens=n * input_len**2,
                      num_prefill_seqs=n)
        )  # fmt: skip
    for k in range(1, output_len):
        total += model.step_time_s(
            StepBatch(num_decode_seqs=batch, decode_context_tokens=batch * (input_len + k))
        )
    return total


def table() -> pd.DataFrame:
    """Every published run, its measured latency, the model's and the error in %."""
    rows = []
    for name, (model_name, gpu) in RUNS.items():
        runs = pd.read_csv(DATA / name)
        latency = "e2e_latency_s" if "e2e_latency_s" in runs else "avg_e2e_latency_s"
        for r in runs.itertuples(index=False):
            tp, shape = int(r.tp), (int(r.batch_size), int(r.input_len), int(r.output_len))
            sim = batch_latency_s(RooflineLatencyModel(model_name, gpu, tp), *shape)
            sim_current, current = np.nan, CURRENT.get(gpu)
            if current is not None:
                model = RooflineLatencyModel(model_name, gpu, tp, calibration=current)
                sim_current = batch_latency_s(model, *shape)
            real = float(getattr(r, latency))
            rows.append({
                "source": name.split("_")[1].replace("pr", "vllm#"), "model": model_name,
                "gpu": gpu, "tp": tp, "variant": r.variant, "batch": shape[0],
                "input": shape[1], "output": shape[2], "real_s": real,
                "sim_s": round(sim, 3), "err_pct": round(100.0 * (sim / real - 1.0), 1),
                "sim_vllm08_s": round(sim_current, 3),
                "err_vllm08_pct": round(100.0 * (sim_current / real - 1.0), 1),
            })  # fmt: skip
    return pd.DataFrame(rows)


#: The MoE kernel each source shipped (its tuned config, or the fused kernel it added), as
#: later vLLM runs it; the other variant of each is the code before the PR.
SHIPPED_VARIANT = ("fused_moe_triton (PR)", "tuned fused_moe config for A100 TP2 (PR)",
                   "TP4 with tuned config (PR)", "TP8 with tuned config (PR)")  # fmt: skip


def summary(t: pd.DataFrame) -> pd.DataFrame:
    """Per source and TP, over the shipped variant: median and largest |error|, and the
    ratio of the largest batch's latency to the smallest one's, measured and modelled."""
    t = t[t["variant"].isin(SHIPPED_VARIANT)]
    rows = []
    for (source, tp), g in t.groupby(["source", "tp"], sort=False):
        g = g.sort_values("batch")
        first, last = g.iloc[0], g.iloc[-1]
        rows.append({
            "source": source, "model": first.model, "gpu": first.gpu, "tp": tp,
            "batches": f"{first.batch}-{last.batch}",
            "median_abs_err_pct": round(float(np.median(np.abs(g["err_pct"]))), 1),
            "max_abs_err_pct": round(float(np.abs(g["err_pct"]).max()), 1),
            "median_abs_err_vllm08_pct": round(float(np.median(np.abs(g["err_vllm08_pct"]))), 1),
            "growth_real": round(last.real_s / first.real_s, 2),
            "growth_sim": round(last.sim_s / first.sim_s, 2),
        })  # fmt: skip
    return pd.DataFrame(rows)


def tp_scaling(t: pd.DataFrame) -> pd.DataFrame:
    """Mixtral-8x22B's latency at TP8 over TP4 (the shipped kernel), by batch: measured and
    modelled under each calibration."""
    t = t[(t["model"] == "mixtral-8x22b") & t["variant"].isin(SHIPPED_VARIANT)]
    by_tp = {tp: g.set_index("batch") for tp, g in t.groupby("tp")}
    four, eight = by_tp[4], by_tp[8]
    return pd.DataFrame({
        "real": eight["real_s"] / four["real_s"],
        "sim": eight["sim_s"] / four["sim_s"],
        "sim_vllm08": eight["sim_vllm08_s"] / four["sim_vllm08_s"],
    }).round(3).reset_index()  # fmt: skip


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    t = table()
    print(t.to_string(index=False))
    print("\nThe shipped kernel of each source (the PR's), by source and TP\n")
    print(summary(t).to_string(index=False))
    print("\nMixtral-8x22B on A100-80GB: latency at TP8 / latency at TP4\n")
    print(tp_scaling(t).to_string(index=False))
    return t


if __name__ == "__main__":
    main()
