"""The fidelity report's tables and plot: percentiles of real and simulated records, their
relative errors (CSV and markdown), and the CDF overlay."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.fidelity_probe import Probe

METRICS = ("ttft_ms", "tpot_ms", "latency_ms")
STATS = (50, 90, 99)


def summarize(records: pd.DataFrame) -> dict[str, float]:
    done = records[records["status"].astype(str).str.upper().str.contains("COMPLETED")]
    out: dict[str, float] = {"completed": float(len(done))}
    for metric in METRICS:
        values = done[metric].dropna().to_numpy(dtype=float)
        for q in STATS:
            out[f"{metric.removesuffix('_ms')}_p{q}_ms"] = (
                float(np.percentile(values, q)) if values.size else float("nan"))
    span = float(done["finish_time_s"].max() - records["arrival_time_s"].min())
    out["throughput_rps"] = len(done) / span if span > 0 else float("nan")
    out["output_tokens_per_s"] = float(done["num_output_tokens"].sum()) / span if span > 0 else (
        float("nan"))
    return out


def compare(label: str, rate: float, frac: float, real: pd.DataFrame, sim: pd.DataFrame
            ) -> list[dict[str, Any]]:
    r, s = summarize(real), summarize(sim)
    return [{"run": label, "rate_rps": round(rate, 3), "load_frac": round(frac, 3),
             "metric": k, "real": r[k], "sim": s[k],
             "rel_error": (s[k] - r[k]) / r[k] if r[k] else float("nan")} for k in r]


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table of ``frame`` (index columns first); numbers with one decimal."""
    flat = frame.reset_index()
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row]
             for row in flat.itertuples(index=False)]
    head = [str(c) for c in flat.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def errors_pct(table: pd.DataFrame) -> pd.DataFrame:
    shown = table[table["metric"] != "completed"]
    return shown.pivot_table(index=["run", "rate_rps"], columns="metric", values="rel_error",
                             sort=False) * 100


def write_tables(rows: list[dict[str, Any]], out: Path, profile_note: str = "",
                 adjusted_rows: list[dict[str, Any]] | None = None,
                 probes: Sequence[Probe] = ()) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.to_csv(out / "fidelity.csv", index=False)
    shown = table[table["metric"] != "completed"]
    both = shown.assign(cell=[f"{a:.1f} / {b:.1f}" for a, b in zip(shown.real, shown.sim,
                                                                    strict=True)])
    values = both.pivot_table(index=["run", "rate_rps"], columns="metric", values="cell",
                              aggfunc="first", sort=False)
    md = [f"Profile: {profile_note}", "",
          "## Relative error of the simulator, % ((sim - real) / real)", "",
          markdown(errors_pct(table)), "", "## Real / simulated values (ms; rps; tokens/s)", "",
          markdown(values), ""]
    if adjusted_rows:
        adjusted = pd.DataFrame(adjusted_rows)
        adjusted.to_csv(out / "fidelity_adjusted.csv", index=False)
        speed = pd.DataFrame([p.to_dict() for p in probes]).set_index("before")
        speed["ratio"] = [f"{r:.3f}" for r in speed["ratio"]]  # markdown() shows one decimal
        factors = adjusted.drop_duplicates("run").set_index("run")["speed_factor"]
        md += ["## The engine's speed against its profile (probe: real / simulated mean e2e)", "",
               markdown(speed), "",
               "A run's factor is the geometric mean of the probes before and after it: "
               + ", ".join(f"{run} {f:.3f}" for run, f in factors.items()) + ".", "",
               "## Relative error with the profile scaled by the run's factor, %", "",
               markdown(errors_pct(adjusted)), ""]
    (out / "fidelity.md").write_text("\n".join(md))
    return table


def plot_cdfs(runs: Sequence[tuple[str, pd.DataFrame, pd.DataFrame]], path: Path) -> Path:
    """One row per run, one column per metric: the real (solid) and simulated (dashed) CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), len(METRICS), figsize=(4 * len(METRICS), 2.6 * len(runs)),
                             squeeze=False)
    for row, (label, real, sim) in enumerate(runs):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            for frame, style, name in ((real, "-", "real vLLM"), (sim, "--", "simulated")):
                x = np.sort(frame[metric].dropna().to_numpy(dtype=float))
                ax.plot(x, np.arange(1, x.size + 1) / max(x.size, 1), style, label=name)
            ax.set_xscale("log" if metric != "tpot_ms" else "linear")
            ax.set_xlabel(metric)
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("CDF")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
