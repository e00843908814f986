"""Does moving running decodes between replicas (Llumnix-style migration) pay off, and where?

    python -m experiments.migration                  # the table in docs/migration.md
    python -m experiments.migration --rates 2 3 -- router=load_balanced

Each rate (Poisson arrivals of ShareGPT-length requests, up to a 2,048-token context, on
``cluster=migration_opt13b``: four OPT-13B replicas with KV for about 17k tokens each) runs
with and without ``migration=kv_balance``, under each router of ``--routers``, on the same
requests, for each seed of ``--seeds`` (a different request sequence each). Per
configuration, the mean over the seeds of: TTFT p50 and p99, TPOT p99, end-to-end p99, the
engines' preemptions, and what migration did (moves handed over, GB copied, mean downtime).
Overrides after ``--`` apply to every run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pandas as pd

from experiments.api import compose_config, split_overrides
from experiments.build import build_run, run_setup

BASE = (
    "cluster=migration_opt13b",
    "workload=poisson_sharegpt",
    "workload.max_context_tokens=2048",
)


def run_one(
    rate: float, router: str, migration: bool, seed: int, overrides: Sequence[str]
) -> dict[str, object]:
    extra = ["migration=kv_balance"] if migration else []
    cfg = compose_config(
        *BASE,
        f"workload.arrival.rate_rps={rate}",
        f"router={router}",
        f"seed={seed}",
        *extra,
        *overrides,
    )
    result = run_setup(build_run(cfg))
    df = result.requests
    done = df[df.status == "COMPLETED"]
    moves = result.info.get("migrations", {})
    return {
        "rate req/s": rate,
        "router": router,
        "migration": "kv_balance" if migration else "off",
        "completed": len(done),
        "TTFT p50 s": done.ttft_ms.quantile(0.5) / 1000,
        "TTFT p99 s": done.ttft_ms.quantile(0.99) / 1000,
        "TPOT p99 ms": done.tpot_ms.quantile(0.99),
        "e2e p99 s": done.latency_ms.quantile(0.99) / 1000,
        "preemptions": int(done.num_preemptions.sum()),
        "moves": int(moves.get("handed_over", 0)),
        "GB copied": moves.get("gb_copied", 0.0),
        "downtime ms": moves.get("mean_downtime_ms", 0.0),
    }


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5])
    parser.add_argument("--routers", nargs="+", default=["round_robin", "load_balanced"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    opts = parser.parse_args(args)
    rows = [
        run_one(rate, router, migration, seed, overrides)
        for router in opts.routers
        for rate in opts.rates
        for migration in (False, True)
        for seed in opts.seeds
    ]
    keys = ["router", "rate req/s", "migration"]
    table = pd.DataFrame(rows).groupby(keys, sort=False).mean().reset_index()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return table


if __name__ == "__main__":
    main()
