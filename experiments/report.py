"""Comparison tables and plots from simulation results (files go where the caller says)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from backends.sim.cluster import RunResult

LABELS = ("policy", "router", "pd")
TABLE_COLUMNS = {
    "goodput_rps": "goodput req/s",
    "slo_compliance": "SLO %",
    "ttft_p50_ms": "TTFT p50 ms",
    "ttft_p99_ms": "TTFT p99 ms",
    "tpot_p50_ms": "TPOT p50 ms",
    "tpot_p99_ms": "TPOT p99 ms",
    "e2e_p50_ms": "E2E p50 ms",
    "e2e_p99_ms": "E2E p99 ms",
    "throughput_tok_s": "tok/s",
    "cost_per_1m_tokens_usd": "$/1M tok",
    "failed": "failed",
}


def summary_row(labels: Mapping[str, str], result: RunResult) -> dict[str, object]:
    """One table row: the run's labels and its headline metrics."""
    m = result.metrics
    done = result.requests[result.requests["status"].astype(str) == "COMPLETED"]

    def pct(col: str, q: float) -> float:
        values = done[col].dropna().to_numpy(dtype=float)
        return float(np.percentile(values, q)) if values.size else float("nan")

    return {
        **labels,
        "requests": len(result.requests),
        "completed": m.completed_requests,
        "failed": m.failed_requests + m.rejected_requests,
        "goodput_rps": m.goodput_requests_per_s,
        "slo_compliance": 100.0 * m.slo_compliance_rate,
        "ttft_p50_ms": pct("ttft_ms", 50),
        "ttft_p99_ms": pct("ttft_ms", 99),
        "tpot_p50_ms": pct("tpot_ms", 50),
        "tpot_p99_ms": pct("tpot_ms", 99),
        "e2e_p50_ms": pct("latency_ms", 50),
        "e2e_p99_ms": pct("latency_ms", 99),
        "throughput_tok_s": m.throughput_tokens_per_s,
        "cost_per_1m_tokens_usd": 1e6 * m.cost_per_token,
        "gpu_utilization": m.avg_gpu_utilization,
        "sim_time_s": result.sim_time_s,
        "wall_time_s": result.wall_time_s,
    }


def format_table(summary: pd.DataFrame) -> str:
    keys = [c for c in LABELS if c in summary and summary[c].nunique() > 1] or [
        c for c in LABELS if c in summary
    ]
    shown = summary[keys + list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS)
    return shown.to_string(index=False, float_format=lambda v: f"{v:,.2f}")


def run_name(row: Mapping[str, object]) -> str:
    return "/".join(str(row[k]) for k in LABELS if k in row)


def plot_latency_cdfs(
    requests: pd.DataFrame, path: Path, columns: Sequence[str] = ("ttft_ms", "latency_ms")
) -> Path:
    """One panel per latency column; one CDF line per run."""
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.5), squeeze=False)
    done = requests[requests["status"].astype(str) == "COMPLETED"]
    for ax, col in zip(axes[0], columns, strict=True):
        for name, group in done.groupby("run", observed=True):
            values = np.sort(group[col].dropna().to_numpy(dtype=float))
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=str(name), lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"{col.replace('_ms', '')} (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower right", ncol=2)
    fig.suptitle("Latency CDF per run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_goodput(summary: pd.DataFrame, path: Path) -> Path:
    """Goodput (requests/s meeting their SLO) and SLO compliance per run."""
    names = [run_name(r) for r in summary.to_dict("records")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names)), 4.5))
    x = np.arange(len(names))
    ax.bar(x, summary["goodput_rps"], color="tab:blue")
    ax.set_ylabel("goodput (req/s meeting SLO)")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    twin = ax.twinx()
    twin.plot(x, summary["slo_compliance"], "o", color="tab:red")
    twin.set_ylabel("SLO compliance (%)", color="tab:red")
    twin.set_ylim(0, 105)
    fig.suptitle("Goodput and SLO compliance per run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
