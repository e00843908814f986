"""What the fault-recovery policies buy: a partition between the PD pools, and engines that
die (one for good, one in a crash loop), with and without recovery.

    python -m experiments.recovery                   # the tables in docs/failures.md
    python -m experiments.recovery -- workload.arrival_scale=0.5

Every scenario runs the default cluster (four OPT-13B A100 replicas; with PD, one prefill and
three decode) on the default workload (the Azure conversation trace slice), the same
requests in each. Partition: every KV link of the decode pools is down from 60 s to 120 s,
with no link policy and with ``links=link_breaker``. Crashes: at 60 s ``ondemand-0`` dies
for good and ``ondemand-1`` goes into a crash loop for 200 s (each start crashes 5 s
later), with no restart policy, with ``restart=backoff`` without probation, and with it.
Overrides after ``--`` apply to every run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pandas as pd

from experiments.api import compose_config, split_overrides
from experiments.build import build_run, run_setup

PARTITION = (
    "faults=[{group:decode-od,kind:link,at_s:60,duration_s:60},"
    "{group:decode-spot,kind:link,at_s:60,duration_s:60}]"
)
CRASHES = (
    "faults=[{instance_id:ondemand-0,kind:crash,at_s:60},"
    "{instance_id:ondemand-1,kind:crashloop,at_s:60,duration_s:200,fail_after_s:5}]"
)
SCENARIOS: dict[str, tuple[str, ...]] = {
    "PD, no fault": ("pd=threshold",),
    "PD, partition, no link policy": ("pd=threshold", PARTITION),
    "PD, partition, link_breaker": ("pd=threshold", PARTITION, "links=link_breaker"),
    "no fault": (),
    "crashes, no restart": (CRASHES,),
    "crashes, backoff without probation": (CRASHES, "restart=backoff", "restart.probation=false"),
    "crashes, backoff": (CRASHES, "restart=backoff"),
}


def run_one(name: str, overrides: Sequence[str]) -> dict[str, object]:
    result = run_setup(build_run(compose_config(*SCENARIOS[name], *overrides)))
    df, m = result.requests, result.metrics
    done = df[df.status == "COMPLETED"]
    recovery = result.info.get("recovery", {})
    return {
        "scenario": name,
        "completed": len(done),
        "failed": int((df.status == "FAILED").sum()),
        "SLO met": m.slo_compliance_rate,
        "TTFT p99 s": done.ttft_ms.quantile(0.99) / 1000,
        "e2e p99 s": done.latency_ms.quantile(0.99) / 1000,
        "last done s": result.sim_time_s,
        "restarts": recovery.get("restarts", 0),
    }


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    ours, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    args = parser.parse_args(ours)
    table = pd.DataFrame([run_one(name, overrides) for name in args.scenarios])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return table


if __name__ == "__main__":
    main()
