"""One user floods the cluster beside a light one: what each user gets under FIFO, fair
sharing and quotas (docs/quotas.md).

    python -m experiments.fairness                 # the table in docs/quotas.md
    python -m experiments.fairness -- cluster=small profile=vllm-opt-13b-a100-80gb-tp1

A heavy user sends ``--heavy-rate`` req/s (Poisson; 40 is ten times cluster/small's
capacity) and a light one ``--light-rate``, for ``--duration-s``; each request has 800
prompt and 300 output tokens. Each row is one configuration: the per-user counts by final
status and the light user's median and p90 wait in the control plane's queue and TTFT.
Overrides after ``--`` apply to every configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cpsim.types import RequestMetadata
from experiments.api import compose_config, split_overrides
from experiments.build import build_run

CONFIGURATIONS = {
    "fifo": ("policy=fifo",),
    "fair_share": ("policy=fair_share",),
    "fifo + quotas (hold)": ("policy=fifo", "quotas=per_user"),
    "fifo + quotas (reject)": ("policy=fifo", "quotas=per_user", "quotas.over_limit=reject"),
}


def flood_requests(
    duration_s: float = 60.0, heavy_rate: float = 40.0, light_rate: float = 1.0, seed: int = 0
) -> list[tuple[float, RequestMetadata]]:
    """A heavy user at ``heavy_rate`` req/s and a light one at ``light_rate``, Poisson
    arrivals over ``duration_s``, 800 prompt and 300 output tokens each."""
    rng = np.random.default_rng(seed)
    out = []
    for user, rate in (("heavy", heavy_rate), ("light", light_rate)):
        times = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * duration_s * 2) + 10))
        for i, t in enumerate(times[times < duration_s]):
            meta = RequestMetadata(
                f"{user}-{i}", user_id=user, num_prompt_tokens=800, max_tokens=300
            )
            out.append((float(t), meta))
    return sorted(out, key=lambda x: x[0])


def simulate_flood(requests: list[tuple[float, RequestMetadata]], *overrides: str) -> pd.DataFrame:
    """The per-request records of ``requests`` run through the composed configuration."""
    setup = build_run(compose_config("workload=tiny", *overrides))
    return setup.simulation.run(requests).requests


def summarize(name: str, records: pd.DataFrame) -> dict[str, object]:
    row: dict[str, object] = {"configuration": name}
    for user in ("heavy", "light"):
        mine = records[records.user_id == user]
        counts = mine.status.astype(str).value_counts()
        row[f"{user} completed"] = int(counts.get("COMPLETED", 0))
        row[f"{user} rejected"] = int(counts.get("REJECTED", 0))
        done = mine[mine.status == "COMPLETED"]
        row[f"{user} p50 wait s"] = round(float(done.queue_delay_ms.median()) / 1000, 1)
    light = records[(records.user_id == "light") & (records.status == "COMPLETED")]
    row["light p90 wait s"] = round(float(light.queue_delay_ms.quantile(0.9)) / 1000, 1)
    row["light p90 TTFT s"] = round(float(light.ttft_ms.quantile(0.9)) / 1000, 1)
    return row


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--heavy-rate", type=float, default=40.0)
    parser.add_argument("--light-rate", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(args)
    requests = flood_requests(opts.duration_s, opts.heavy_rate, opts.light_rate, opts.seed)
    rows = [
        summarize(name, simulate_flood(requests, *config, *overrides))
        for name, config in CONFIGURATIONS.items()
    ]
    table = pd.DataFrame(rows).set_index("configuration")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string())
    return table


if __name__ == "__main__":
    main()
