"""Cost prediction: from a run's history, the cheapest cluster that meets an SLO at a given
request rate, and what the next hour costs on it; checked against what actually comes next.

    python -m experiments.cost_forecast                      # the check in docs/cost_forecast.md
    python -m experiments.cost_forecast --rates 6 9 12 -- profile=vllm-opt-13b-a100-80gb-tp1

**Forecast**: the history (a run's per-request records) is resampled into the future: Poisson
arrivals at the asked rate, each taking the prompt and output lengths, SLO, priority and
user of a request drawn from the history (``HistoryWorkload``). That workload runs on pools
of 1, 2, ... instances (``cluster.groups.0.count``, a binary search: SLO attainment grows
with the pool) and the smallest that meets ``--slo-target`` % is the answer; the next hour
costs its price per hour.

**Check**: the default history is the first ``--history-min`` minutes of the Azure 2023
conversation trace as simulated on a pool of ``--history-count``
replicas (with ``workload/azure_conv_study``'s SLOs, users and priorities); the ground
truth is the trace's next ``--future-min`` minutes, replayed at each
rate (its own arrival pattern and requests, not resampled), on every pool size. The table
gives, per rate, the forecast and true cheapest pool, their prices per hour, and the SLO
attainment the forecast pool really delivers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from hydra.utils import instantiate

from cpsim.types import RequestMetadata, RequestPriority
from cpsim.validation import check_positive
from experiments.api import compose_config, split_overrides
from experiments.build import build_run
from experiments.report import summary_row

HISTORY_COLUMNS = ("num_prompt_tokens", "num_output_tokens", "slo_deadline_ms", "priority",
                   "user_id")  # fmt: skip


@dataclass(frozen=True)
class HistoryWorkload:
    """Requests resampled from a run's records: Poisson arrivals at ``rate_rps`` for
    ``duration_s``, each with the lengths, SLO, priority and user of a record drawn at
    random (with replacement). Records that produced no output token (rejected, failed
    before it) lend their prompt and the output they asked for is unknown: they are left out."""

    records: pd.DataFrame
    rate_rps: float
    duration_s: float
    id_prefix: str = "hist-"

    def __post_init__(self) -> None:
        check_positive("rate_rps", self.rate_rps)
        check_positive("duration_s", self.duration_s)
        missing = sorted(set(HISTORY_COLUMNS) - set(self.records.columns))
        if missing:
            raise ValueError(f"history records lack columns {missing}; give a run's records")
        if not (self.records["num_output_tokens"] > 0).any():
            raise ValueError("the history has no request that produced a token to resample")

    @property
    def mean_rate_rps(self) -> float:
        return self.rate_rps

    def requests(self, seed: int | np.random.Generator) -> Iterator[tuple[float, RequestMetadata]]:
        rng = np.random.default_rng(seed)
        pool = self.records[self.records["num_output_tokens"] > 0]
        n = int(rng.poisson(self.rate_rps * self.duration_s))
        times = np.sort(rng.random(n) * self.duration_s)
        picks = rng.integers(0, len(pool), n)
        prompt = pool["num_prompt_tokens"].to_numpy(dtype=np.int64)[picks]
        output = pool["num_output_tokens"].to_numpy(dtype=np.int64)[picks]
        slo = pool["slo_deadline_ms"].to_numpy(dtype=float)[picks]
        priority = pool["priority"].astype(str).to_numpy()[picks]
        user = pool["user_id"].astype(str).to_numpy()[picks]
        for i in range(n):
            yield float(times[i]), RequestMetadata(
                f"{self.id_prefix}{i}",
                user_id=str(user[i]),
                priority=RequestPriority[str(priority[i])],
                slo_deadline_ms=None if np.isnan(slo[i]) else float(slo[i]),
                max_tokens=int(output[i]),
                num_prompt_tokens=int(prompt[i]),
            )

    def describe(self) -> dict[str, Any]:
        return {"workload": "history", "rate_rps": self.rate_rps, "records": len(self.records)}


def run_on_pool(
    count: int, requests: Callable[[], Any], overrides: Sequence[str]
) -> dict[str, object]:
    """The summary of ``requests()`` on a fixed pool of ``count`` replicas."""
    cfg = compose_config("cluster=autoscale_opt13b", f"cluster.groups.0.count={count}",
                         "workload=tiny", *overrides)  # fmt: skip
    setup = build_run(cfg, labels={"count": str(count)})
    result = setup.simulation.run(requests())
    result.info.update(setup.info)
    return summary_row({"count": str(count)}, result)


def cheapest_pool(
    requests: Callable[[], Any],
    slo_target: float,
    max_count: int,
    overrides: Sequence[str] = (),
) -> tuple[int | None, dict[int, dict[str, object]]]:
    """The smallest pool meeting ``slo_target`` % (a binary search; None if even
    ``max_count`` does not), and the summaries of the pools tried."""
    tried: dict[int, dict[str, object]] = {}

    def meets(count: int) -> bool:
        if count not in tried:
            tried[count] = run_on_pool(count, requests, overrides)
        return float(str(tried[count]["slo_compliance"])) >= slo_target

    low, high = 1, max_count
    if not meets(high):
        return None, tried
    while low < high:
        mid = (low + high) // 2
        if meets(mid):
            high = mid
        else:
            low = mid + 1
    return low, tried


@dataclass(frozen=True)
class Forecast:
    rate_rps: float
    count: int | None
    usd_per_hour: float
    pools: dict[int, dict[str, object]]


def forecast(
    history: pd.DataFrame,
    rate_rps: float,
    slo_target: float = 95.0,
    max_count: int = 10,
    duration_s: float = 1200.0,
    overrides: Sequence[str] = (),
    seed: int = 0,
) -> Forecast:
    """The cheapest pool meeting ``slo_target`` % at ``rate_rps``, from ``history``
    resampled over ``duration_s``, and its price per hour (what the next hour costs)."""
    workload = HistoryWorkload(history, rate_rps, duration_s)
    count, pools = cheapest_pool(lambda: workload.requests(seed), slo_target, max_count, overrides)
    price = float(str(pools[count]["usd_per_hour"])) if count is not None else float("nan")
    return Forecast(rate_rps, count, price, pools)


def check(opts: argparse.Namespace, overrides: Sequence[str]) -> pd.DataFrame:
    """Forecasts from the trace's first minutes against its next minutes, per rate."""
    history_s, future_s = 60.0 * opts.history_min, 60.0 * opts.future_min
    # the study's trace (its SLOs, users and priorities, OPT's context) at its own pace
    base = ["workload=azure_conv_study", "workload.time_scale=1.0"]
    pool = f"cluster.groups.0.count={opts.history_count}"
    past = compose_config("cluster=autoscale_opt13b", pool, *base,
                          f"workload.duration_s={history_s}", *overrides)  # fmt: skip
    setup = build_run(past)
    history = setup.simulation.run(setup.workload.requests(0)).requests
    rows = []
    for rate in opts.rates:
        predicted = forecast(history, rate, opts.slo_target, opts.max_count,
                             opts.forecast_min * 60.0, overrides)  # fmt: skip
        future = compose_config(*base, f"workload.start_s={history_s}",
                                f"workload.duration_s={future_s}",
                                f"+workload.rate_rps={rate}", *overrides).workload  # fmt: skip
        actual = instantiate(future)
        true_count, true_pools = cheapest_pool(lambda a=actual: a.requests(0), opts.slo_target,
                                               opts.max_count, overrides)  # fmt: skip
        if predicted.count is not None and predicted.count not in true_pools:
            true_pools[predicted.count] = run_on_pool(
                predicted.count, lambda a=actual: a.requests(0), overrides
            )
        delivered = (
            float(str(true_pools[predicted.count]["slo_compliance"]))
            if predicted.count is not None
            else float("nan")
        )
        true_price = (
            float(str(true_pools[true_count]["usd_per_hour"]))
            if true_count is not None
            else float("nan")
        )
        rows.append(
            {
                "rate req/s": rate,
                "forecast pool": predicted.count,
                "forecast $/h": round(predicted.usd_per_hour, 2),
                "true pool": true_count,
                "true $/h": round(true_price, 2),
                "SLO % the forecast pool delivers": round(delivered, 1),
            }
        )
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 12.0])
    parser.add_argument("--slo-target", type=float, default=95.0, help="% of requests")
    parser.add_argument("--history-min", type=float, default=20.0)
    parser.add_argument("--history-count", type=int, default=4)
    parser.add_argument("--future-min", type=float, default=40.0)
    parser.add_argument("--forecast-min", type=float, default=20.0,
                        help="minutes of resampled load each forecast simulates")  # fmt: skip
    parser.add_argument("--max-count", type=int, default=10)
    opts = parser.parse_args(args)
    table = check(opts, overrides)
    with pd.option_context("display.width", 200):
        print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
