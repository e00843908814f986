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

    arrivals = result.requests["arrival_time_s"].to_numpy(dtype=float)
    span_s = float(arrivals.max() - arrivals.min()) if arrivals.size > 1 else 0.0
    return {
        **labels,
        "requests": len(result.requests),
        "offered_rps": (arrivals.size - 1) / span_s if span_s > 0 else float("nan"),
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
        "usd_per_hour": result.info.get("usd_per_hour", float("nan")),
        "gpu_hours": result.info.get("gpu_hours", float("nan")),
        "total_cost_usd": m.total_cost_usd,
        "gpu_utilization": m.avg_gpu_utilization,
        "sim_time_s": result.sim_time_s,
        "wall_time_s": result.wall_time_s,
    }


def format_table(summary: pd.DataFrame) -> str:
    labels = (*LABELS, "load")
    keys = [c for c in labels if c in summary and summary[c].nunique() > 1] or [
        c for c in LABELS if c in summary
    ]
    shown = summary[keys + list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS)
    return shown.to_string(index=False, float_format=lambda v: f"{v:,.2f}")


def run_name(row: Mapping[str, object]) -> str:
    name = "/".join(str(row[k]) for k in LABELS if k in row)
    return f"{name}@{float(str(row['load'])):g}x" if "load" in row else name


def config_name(row: Mapping[str, object]) -> str:
    """A run's configuration without its load: one line of a curve over load."""
    return "/".join(str(row[k]) for k in LABELS if k in row)


def goodput_by_load(summary: pd.DataFrame) -> str:
    """Goodput (req/s meeting SLO) of each configuration (rows) at each load (columns)."""
    rows = summary.assign(config=summary.apply(config_name, axis=1))
    table = rows.pivot_table(index="config", columns="load", values="goodput_rps", sort=False)
    offered = rows.groupby("load")["offered_rps"].mean()
    table.columns = [f"{load:g}x ({offered[load]:.1f}/s)" for load in table.columns]
    return "goodput (req/s) by load (offered req/s):\n" + table.to_string(
        float_format=lambda v: f"{v:.2f}"
    )


#: The curves over load: (summary column, axis label, log scale).
LOAD_PANELS = (
    ("slo_compliance", "SLO attainment (%)", False),
    ("goodput_rps", "goodput (req/s meeting SLO)", False),
    ("ttft_p99_ms", "TTFT p99 (ms, log scale)", True),
    ("tpot_p99_ms", "TPOT p99 (ms)", False),
    ("e2e_p99_ms", "end-to-end p99 (ms, log scale)", True),
    ("cost_per_1m_tokens_usd", "cost ($ per 1M tokens)", False),
)


def plot_load_curves(summary: pd.DataFrame, path: Path) -> Path:
    """Each configuration's metrics against the offered load (DistServe's "SLO attainment vs
    rate"): colour = policy, or router where the router is not the study's first; line style
    and marker = PD off or on."""
    names = summary.apply(config_name, axis=1)
    policies = list(dict.fromkeys(summary["policy"]))
    routers = list(dict.fromkeys(summary["router"]))
    pds = list(dict.fromkeys(summary["pd"]))
    hues = [*policies, *routers[1:]]
    colours = dict(zip(hues, plt.get_cmap("tab10").colors, strict=False))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for name, runs in summary.groupby(names, sort=False):
        runs = runs.sort_values("offered_rps")
        first = runs.iloc[0]
        hue = first["policy"] if first["router"] == routers[0] else first["router"]
        line, marker = styles[pds.index(first["pd"]) % len(styles)]
        for ax, (col, _, _) in zip(axes.flat, LOAD_PANELS, strict=True):
            ax.plot(
                runs["offered_rps"], runs[col], line, marker=marker, ms=4, lw=1.4,
                color=colours.get(hue, "black"), label=str(name),
            )  # fmt: skip
    for ax, (_, label, log) in zip(axes.flat, LOAD_PANELS, strict=True):
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylim(0, 105)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("Each configuration against the offered load (policy/router/PD)")
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: Goodputs within this fraction of each other count as a tie in the conclusions.
TIE = 0.01


def load_conclusions(summary: pd.DataFrame) -> list[str]:
    """What the curves say, in a few sentences computed from the summary: the best
    configuration per load, where the base configuration saturates, what the best policy
    buys over the first, and where PD separation beats colocated serving."""
    rows = summary.assign(config=summary.apply(config_name, axis=1))
    lines = []
    best = rows.loc[rows["goodput_rps"].idxmax()]
    lines.append(
        f"Highest goodput: {best['config']} at {best['load']:g}x load "
        f"({best['offered_rps']:.2f} req/s offered): "
        f"{best['goodput_rps']:.2f} req/s meet their SLO."
    )
    winners = []
    for load, g in rows.groupby("load", sort=True):
        top = g.loc[g["goodput_rps"].idxmax()]
        if top["goodput_rps"] <= (1 + TIE) * g["goodput_rps"].median():
            winners.append(f"{load:g}x a tie")
        else:
            winners.append(f"{load:g}x {top['config']}")
    lines.append(
        f"Best goodput per load (a tie: within {TIE:.0%} of the median): {', '.join(winners)}."
    )
    base = rows[rows["config"] == rows["config"].iloc[0]].sort_values("load")
    peak = base.loc[base["goodput_rps"].idxmax()]
    last = base.iloc[-1]
    lines.append(
        f"{peak['config']} peaks at {peak['load']:g}x ({peak['goodput_rps']:.2f} req/s, "
        f"SLO {peak['slo_compliance']:.0f}%); at {last['load']:g}x its SLO attainment is "
        f"{last['slo_compliance']:.0f}% and p99 TTFT {last['ttft_p99_ms'] / 1000:.1f} s."
    )
    first = rows.iloc[0]
    same = (rows["router"] == first["router"]) & (rows["pd"] == first["pd"])
    gains = []
    for load, g in rows[same].groupby("load", sort=True):
        top = g.loc[g["goodput_rps"].idxmax()]
        ref = float(g[g["policy"] == first["policy"]]["goodput_rps"].iloc[0])
        if top["goodput_rps"] <= (1 + TIE) * ref:
            gains.append(f"{load:g}x none")
        else:
            gains.append(f"{load:g}x {top['policy']} {100 * (top['goodput_rps'] / ref - 1):+.0f}%")
    lines.append(f"Best policy's goodput gain over {first['policy']}: {', '.join(gains)}.")
    lines.append(_pd_crossover(rows, first))
    return lines


def _pd_crossover(rows: pd.DataFrame, first: pd.Series) -> str:
    """Where PD separation's goodput overtakes colocated serving, same policy and router."""
    same = (rows["policy"] == first["policy"]) & (rows["router"] == first["router"])
    table = rows[same].pivot_table(index="load", columns="pd", values="goodput_rps")
    others = [c for c in table.columns if c != "off"]
    if "off" not in table or not others:
        return "PD separation: the study has no PD-on and PD-off pair to compare."
    on = others[0]
    ratio = table[on] / table["off"]
    ahead = ratio[ratio > 1 + TIE]
    where = ", ".join(f"{load:g}x {100 * (r - 1):+.0f}%" for load, r in ratio.items())
    if ahead.empty:
        return (
            f"PD separation ({on}) never beats colocated serving on goodput here "
            f"({first['policy']}/{first['router']}; PD vs colocated: {where})."
        )
    loads = ", ".join(f"{load:g}x" for load in ahead.index)
    return (
        f"PD separation ({on}) beats colocated serving on goodput at {loads} "
        f"({first['policy']}/{first['router']}; PD vs colocated: {where})."
    )


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
