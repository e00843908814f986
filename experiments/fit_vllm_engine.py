"""Fits the engine terms of a current vLLM (0.8.3, its V1 engine: decode steps captured in CUDA
graphs, its own all-reduce kernel within a node) on public per-request logs, and writes the
``vllm-0.8-a100`` calibration.

    python -m experiments.fit_vllm_engine            # fit, print the held-out tables
    python -m experiments.fit_vllm_engine --write    # also write cpsim/data/calibrations/

No step timings of a current vLLM are public (docs/latency-model.md), so the fit runs the
simulator: the public TP8 runs of Llama-3.3-70B on 8 x A100-40GB
(``data/published/llm-k8s-llama33-70b-a100/``, four request rates sent back to back to one
server that kept its prefix cache) are replayed with candidate engine terms, and the two
terms the runs can tell apart are chosen to match the measured TPOT at the lightest load
(1 req/s: a few sequences a step) and the heaviest (all 200 requests at once: about 200).
TPOT is the engine's; what TTFT adds under load is the frontend's (one API-server process
that handles every stream's tokens in turn), and its cost per stream and step
(``frontend_stream_s``) is then chosen to match TTFT at 16 req/s. 4 req/s is held out
whole (and, as a cross-check, the frontend fitted at 4 req/s is tried at 16), as are the
TP4 x PP2 runs (another engine, V0, and layout); the engine terms are fitted once more
with the frontend in place. Everything else comes from the Splitwise-fitted A100 calibration (the
GPU's achieved bandwidth and FLOP fractions, measured on kernels and 2023 steps) and from a
public measurement of vLLM's custom all-reduce (``data/published/sglang-custom-allreduce/``).
About three minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.fit_latency_model import fit_link
from experiments.replay import DEFAULT_COLUMNS, compare, read_log, simulate_logs

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "data/published/llm-k8s-llama33-70b-a100"
ALL_REDUCE_CSV = ROOT / "data/published/sglang-custom-allreduce/vllm_custom_allreduce_h100.csv"
CALIBRATIONS = ROOT / "cpsim/data/calibrations"
BASE = "vllm-a100-80gb"
NAME = "vllm-0.8-a100"
RATES = ("1", "4", "16", "inf")  # the order the runs were sent in
FITTED_ON = ("1", "inf")
FRONTEND_FITTED_ON = "16"
CLUSTER = ["cluster=llm_k8s_llama33_70b", "~profile"]
TP4_PP2 = [
    "cluster.groups.0.tensor_parallel_size=4",
    "+cluster.groups.0.pipeline_parallel_size=2",
    "cluster.replica.max_num_seqs=256",
    "+cluster.groups.0.gpus_per_node=4",
]
METRICS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")


@cache
def custom_all_reduce_latency() -> dict[int, float]:
    """Per TP degree, the latency of latency + bytes / bandwidth fitted (as every link table
    is, on relative error) on the kernel's published timings for messages of 2 KiB to 4 MiB;
    read once, for every grid point."""
    table = pd.read_csv(ALL_REDUCE_CSV)
    return {
        int(tp): fit_link(rows.set_index("bytes")["latency_ms"] / 1e3).latency_s
        for tp, rows in table.groupby("tp")
    }


def calibration(layer_s: float, seq_s: float, stream_s: float = 0.0) -> dict[str, Any]:
    """The base calibration with a current vLLM's engine terms: the custom all-reduce's
    latency (bandwidth: NCCL's on the node, which vLLM uses for large messages), no
    per-layer cost growing with TP (the 2023 engine's launched and synchronised its NCCL
    calls from the host each layer; CUDA graphs replay them), ``layer_s`` and ``seq_s``;
    and its frontend's cost per stream and step, ``stream_s``."""
    cal = json.loads((CALIBRATIONS / f"{BASE}.json").read_text())
    latency = custom_all_reduce_latency()
    cal["all_reduce"] = {
        tp: {"latency_s": round(latency[int(tp)], 9), "bytes_per_s": link["bytes_per_s"]}
        for tp, link in cal["all_reduce"].items()
    }
    cal.update(
        name=NAME,
        gpu="A100-40GB",
        applies_to=["A100-80GB"],
        default=False,
        engine="vLLM 0.8.3, V1 engine (CUDA graphs, custom all-reduce), as run by surajssd/llm-k8s",
        layer_s=round(layer_s, 9),
        layer_s_per_tp_doubling=0.0,
        seq_s=round(seq_s, 9),
        frontend_stream_s=round(stream_s, 9),
    )
    cal.pop("fit", None)
    return cal


def simulate(
    cal: dict[str, Any], setup: str = "tp8", rates: Sequence[str] = RATES
) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """The setup's logs, and their requests replayed back to back under ``cal``."""
    logs = [read_log(LOGS / f"{setup}-qps{r}.csv", dict(DEFAULT_COLUMNS)) for r in rates]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibration.json"
        path.write_text(json.dumps(cal))
        overrides = [*CLUSTER, f"cluster.groups.0.calibration={path}"]
        overrides += TP4_PP2 if setup.startswith("tp4pp2") else []
        return logs, simulate_logs(logs, overrides, same_prompts=True)


def replay(cal: dict[str, Any], setup: str = "tp8", rates: Sequence[str] = RATES) -> pd.DataFrame:
    """The setup's logs replayed back to back under ``cal``: one row per rate, the errors
    of TTFT and TPOT p50 / p90 in %."""
    return errors(setup, rates, *simulate(cal, setup, rates))


def errors(
    setup: str, rates: Sequence[str], logs: list[pd.DataFrame], sims: list[pd.DataFrame]
) -> pd.DataFrame:
    """One row per rate: real and simulated TTFT and TPOT p50 / p90, and their errors in %."""
    rows = []
    for rate, log, sim in zip(rates, logs, sims, strict=True):
        row = compare(f"{setup}-qps{rate}", log, sim, np.inf, np.inf)
        rows.append({"log": row["log"], **{
            f"{m}_{part}": round(float(row[f"{m}_{key}"]), 1)
            for m in METRICS
            for part, key in (("real_ms", "real_ms"), ("sim_ms", "sim_ms"), ("err_pct", "err_%"))
        }})  # fmt: skip
    return pd.DataFrame(rows)


def ttft_gap(logs: list[pd.DataFrame], sims: list[pd.DataFrame]) -> pd.DataFrame:
    """Where the TP8 runs' TTFT gap lies (``simulate``'s logs and records at every rate),
    one row per rate below saturation: TTFT = a + b x prompt tokens fitted (least squares)
    on the real and on the simulated requests, and the median real - simulated TTFT over
    each fifth of the run, in arrival order."""
    rows = []
    for rate, log, sim in zip(RATES, logs, sims, strict=True):
        if rate == "inf":
            continue
        real, simulated = log["ttft_ms"].to_numpy(), sim["ttft_ms"].to_numpy()
        design = np.c_[np.ones(len(log)), log["prompt"].to_numpy(float)]
        (a_real, b_real), *_ = np.linalg.lstsq(design, real, rcond=None)
        (a_sim, b_sim), *_ = np.linalg.lstsq(design, simulated, rcond=None)
        fifths = np.array_split(real - simulated, 5)
        rows.append({
            "log": f"tp8-qps{rate}", "a_real_ms": a_real, "a_sim_ms": a_sim,
            "b_real_ms_per_token": b_real, "b_sim_ms_per_token": b_sim,
            **{f"gap_fifth{k + 1}_ms": float(np.median(f)) for k, f in enumerate(fifths)},
        })  # fmt: skip
    return pd.DataFrame(rows).round(4)


def loss(table: pd.DataFrame) -> float:
    """Squared relative TPOT errors (p50 and p90) on the fitted rates."""
    fitted = table[table["log"].isin([f"tp8-qps{r}" for r in FITTED_ON])]
    errors = fitted[["tpot_p50_err_pct", "tpot_p90_err_pct"]].to_numpy() / 100.0
    return float((errors**2).sum())


def ttft_loss(table: pd.DataFrame, rate: str) -> float:
    """Squared relative TTFT errors (p50 and p90) at one rate."""
    row = table[table["log"] == f"tp8-qps{rate}"]
    errors = row[["ttft_p50_err_pct", "ttft_p90_err_pct"]].to_numpy() / 100.0
    return float((errors**2).sum())


def search(
    layers_us: Iterable[float], seqs_us: Iterable[float], stream_s: float = 0.0
) -> tuple[float, float, float]:
    """The grid point (layer_s, seq_s, loss) of least loss, replaying all the rates in order
    so that the prefix cache holds what it held on the real server."""
    best = (0.0, 0.0, np.inf)
    for layer_us, seq_us in itertools.product(layers_us, seqs_us):
        try:
            value = loss(replay(calibration(layer_us * 1e-6, seq_us * 1e-6, stream_s)))
        except RuntimeError:  # the simulated server too slow for the runs to follow each other
            continue
        if value < best[2]:
            best = (layer_us * 1e-6, seq_us * 1e-6, value)
    return best


def search_frontend(
    layer_s: float, seq_s: float, streams_us: Iterable[float], rate: str
) -> tuple[float, float]:
    """The frontend cost (stream_s, loss) of least TTFT loss at ``rate``, replaying the
    rates up to it in order."""
    rates = RATES[: RATES.index(rate) + 1]
    best = (0.0, np.inf)
    for stream_us in streams_us:
        value = ttft_loss(replay(calibration(layer_s, seq_s, stream_us * 1e-6), rates=rates), rate)
        if value < best[1]:
            best = (stream_us * 1e-6, value)
    return best


def fit_frontend(layer_s: float, seq_s: float, rate: str = FRONTEND_FITTED_ON) -> float:
    """A coarse grid of the frontend's cost per stream and step, then a fine one."""
    stream_s, _ = search_frontend(layer_s, seq_s, np.arange(0, 501, 25), rate)
    su = stream_s * 1e6
    return search_frontend(layer_s, seq_s, np.arange(max(0, su - 20), su + 21, 5), rate)[0]


def fit() -> tuple[float, float, float, float]:
    """(layer_s, seq_s, stream_s, loss): the engine terms on a coarse grid then a fine one,
    with no frontend; the frontend's cost given them; the engine terms again on a fine grid,
    with that frontend (it delays the tokens of a busy step, which TPOT at 200 streams sees)."""
    layer_s, seq_s, _ = search(np.arange(40, 150, 10), np.arange(0, 90, 10))
    lu, su = layer_s * 1e6, seq_s * 1e6
    layer_s, seq_s, _ = search(np.arange(lu - 8, lu + 9, 2), np.arange(max(0, su - 8), su + 9, 2))
    stream_s = fit_frontend(layer_s, seq_s)
    lu, su = layer_s * 1e6, seq_s * 1e6
    layer_s, seq_s, value = search(
        np.arange(lu - 6, lu + 7, 2), np.arange(max(0, su - 6), su + 7, 2), stream_s
    )
    return layer_s, seq_s, stream_s, value


def markdown(table: pd.DataFrame) -> str:
    lines = [
        "| log | TTFT p50 | err | TTFT p90 | err | TPOT p50 | err | TPOT p90 | err |",
        "|---|---|---:|---|---:|---|---:|---|---:|",
    ]
    for r in table.itertuples(index=False):
        cells = [r.log]
        for m in METRICS:
            real, sim = getattr(r, f"{m}_real_ms"), getattr(r, f"{m}_sim_ms")
            cells += [f"{real:.1f} / {sim:.1f}", f"{getattr(r, f'{m}_err_pct'):+.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"write {NAME}.json")
    args = p.parse_args(argv)
    layer_s, seq_s, stream_s, value = fit()
    cal = calibration(layer_s, seq_s, stream_s)
    logs, sims = simulate(cal)
    tp8 = errors("tp8", RATES, logs, sims)
    print(f"fitted on TP8 at {', '.join(FITTED_ON)} req/s: layer_s = {layer_s * 1e6:.1f} us, "
          f"seq_s = {seq_s * 1e6:.1f} us (loss {value:.4f}); on TTFT at "
          f"{FRONTEND_FITTED_ON} req/s: frontend_stream_s = {stream_s * 1e6:.0f} us")  # fmt: skip
    print("\nTP8, V1 (4 req/s held out, and TPOT at 16); real / simulated ms, error %\n")
    print(markdown(tp8))
    crossed = fit_frontend(layer_s, seq_s, rate="4")
    print(f"\ncross-check: the frontend fitted on TTFT at 4 req/s instead "
          f"(frontend_stream_s = {crossed * 1e6:.0f} us), 16 req/s held out\n")  # fmt: skip
    print(markdown(replay(calibration(layer_s, seq_s, crossed))))
    no_frontend = replay(calibration(layer_s, seq_s))
    print("\nthe same engine terms without the frontend\n")
    print(markdown(no_frontend))
    print("\nTTFT = a + b x prompt tokens, real and simulated; the median real - simulated TTFT")
    print("(ms) over each fifth of the run, in arrival order\n")
    print(ttft_gap(logs, sims).to_string(index=False))
    others = pd.concat([replay(cal, s) for s in ("tp4pp2-ib", "tp4pp2-ibgdr", "tp4pp2-noib")])
    print("\nTP4 x PP2 over two nodes, V0 (held out: another engine and layout)\n")
    print(markdown(others))
    cal["source"] = (
        "Fitted by `python -m experiments.fit_vllm_engine --write`: layer_s and seq_s on "
        "public per-request logs of vLLM 0.8.3 (V1) serving Llama-3.3-70B at TP8 on 8 x "
        "A100-40GB at 1 req/s and all at once, and frontend_stream_s on TTFT at 16 req/s "
        "(surajssd/llm-k8s, Apache-2.0; "
        "data/published/llm-k8s-llama33-70b-a100), replayed in the simulator; the all-reduce "
        "latency on vLLM's custom all-reduce as measured on H100 in sgl-project/sglang#2904 "
        "(data/published/sglang-custom-allreduce); everything else as in vllm-a100-80gb "
        "(Vidur's kernel and collective timings, Splitwise's vLLM steps); see "
        "docs/latency-model.md"
    )
    cal["fit"] = {
        "fitted_on": [f"tp8-qps{r}" for r in FITTED_ON],
        "frontend_fitted_on": f"tp8-qps{FRONTEND_FITTED_ON}",
        "loss": round(value, 6),
        "heldout_tpot_p50_err_pct": {
            r.log: r.tpot_p50_err_pct
            for r in tp8.itertuples(index=False)
            if r.log not in {f"tp8-qps{x}" for x in FITTED_ON}
        },
        "heldout_ttft_p50_err_pct": {
            r.log: r.ttft_p50_err_pct
            for r in tp8.itertuples(index=False)
            if r.log not in {f"tp8-qps{x}" for x in (*FITTED_ON, FRONTEND_FITTED_ON)}
        },
    }
    if args.write:
        path = CALIBRATIONS / f"{NAME}.json"
        path.write_text(json.dumps(cal, indent=1) + "\n")
        print(f"\nwrote {path.relative_to(ROOT)}")
    return cal


if __name__ == "__main__":
    main()
