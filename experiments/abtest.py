"""A/B tests: compare two configurations on goodput and TTFT, with a significance test that
says when the sample is too small.

    python -m experiments.abtest --a "policy=fifo" --b "policy=priority" [-- OVERRIDES]
    python -m experiments.abtest --records requests.parquet    # a split run (policy=ab_test)

**Paired** (the simulator): the same trace runs under arm A's overrides and arm B's (the
workload's seed fixes it), and each request is compared with itself. Goodput (the share of
requests that complete within their SLO) by McNemar's exact test on the requests one arm
served well and the other not; TTFT (p50, p99) by a paired bootstrap over requests that
completed in both arms.

**Split** (live traffic, or a simulated run with ``policy=ab_test``): each request ran in
one arm (the ``policy`` column's ``A:``/``B:`` prefix); goodput by a two-proportion z test,
TTFT by a bootstrap of each arm.

For each metric: both arms' values, B - A with its 95 % confidence interval, and the
verdict: which arm is better, or that the difference is not significant and how many
requests (per arm) it would take to detect the observed difference with 80 % power.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from experiments.api import split_overrides

ALPHA = 0.05
POWER = 0.8
Z_ALPHA = 1.959963984540054  # two-sided 95 %
Z_POWER = 0.8416212335729143  # 80 % power
BOOTSTRAP = 1000


@dataclass(frozen=True)
class Comparison:
    """One metric of the two arms; ``lower_is_better`` for latencies."""

    metric: str
    a: float
    b: float
    ci_low: float
    ci_high: float
    p_value: float | None
    n: int  # requests per arm the comparison rests on
    needed_n: int | None  # per arm, to detect the observed difference (80 % power)
    lower_is_better: bool

    @property
    def difference(self) -> float:
        return self.b - self.a

    @property
    def significant(self) -> bool:
        return self.ci_low > 0.0 or self.ci_high < 0.0

    @property
    def verdict(self) -> str:
        if self.significant:
            b_better = (self.difference < 0) == self.lower_is_better
            return f"{'B' if b_better else 'A'} is better"
        if self.needed_n is None:
            return "no difference seen"
        return (
            f"not significant: {self.n} requests are too few to tell a difference of "
            f"{abs(self.difference):.3g}; about {self.needed_n} would be needed"
        )

    def row(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "A": round(self.a, 4),
            "B": round(self.b, 4),
            "B - A": round(self.difference, 4),
            "95% CI": f"[{self.ci_low:.4g}, {self.ci_high:.4g}]",
            "p": None if self.p_value is None else round(self.p_value, 4),
            "n": self.n,
            "verdict": self.verdict,
        }


def good(records: pd.DataFrame) -> np.ndarray:
    """Whether each request completed within its SLO (completed, for one without)."""
    done = records["status"].astype(str).to_numpy() == "COMPLETED"
    met = records["slo_met"].to_numpy(dtype=object)
    ok = np.array([m is None or (isinstance(m, float) and math.isnan(m)) or bool(m) for m in met])
    return done & ok


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k or fewer successes of n at 1/2 (McNemar's exact test)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_goodput(good_a: np.ndarray, good_b: np.ndarray) -> Comparison:
    n = good_a.size
    b_only = int((good_b & ~good_a).sum())
    a_only = int((good_a & ~good_b).sum())
    diff = (b_only - a_only) / n if n else 0.0
    discordant = (a_only + b_only) / n if n else 0.0
    se = math.sqrt(max(discordant - diff * diff, 0.0) / n) if n else math.inf
    needed = None
    if diff != 0.0:
        root = Z_ALPHA * math.sqrt(discordant) + Z_POWER * math.sqrt(max(discordant - diff**2, 0))
        needed = math.ceil((root / abs(diff)) ** 2)
    return Comparison(
        "goodput share (paired)",
        float(good_a.mean()) if n else math.nan,
        float(good_b.mean()) if n else math.nan,
        diff - Z_ALPHA * se,
        diff + Z_ALPHA * se,
        _binom_two_sided(min(a_only, b_only), a_only + b_only),
        n,
        needed,
        lower_is_better=False,
    )


def split_goodput(good_a: np.ndarray, good_b: np.ndarray) -> Comparison:
    n_a, n_b = good_a.size, good_b.size
    p_a, p_b = float(good_a.mean()), float(good_b.mean())
    diff = p_b - p_a
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    pooled = (good_a.sum() + good_b.sum()) / (n_a + n_b)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = diff / se0 if se0 > 0 else 0.0
    p_value = math.erfc(abs(z) / math.sqrt(2.0))
    needed = None
    if diff != 0.0:
        var = p_a * (1 - p_a) + p_b * (1 - p_b)
        needed = math.ceil((Z_ALPHA + Z_POWER) ** 2 * var / diff**2)
    return Comparison(
        "goodput share (split)",
        p_a,
        p_b,
        diff - Z_ALPHA * se,
        diff + Z_ALPHA * se,
        p_value,
        min(n_a, n_b),
        needed,
        lower_is_better=False,
    )


def _bootstrap_diffs(
    a: np.ndarray, b: np.ndarray, q: float, paired: bool, rng: np.random.Generator
) -> np.ndarray:
    """B - A of the q-th percentile over ``BOOTSTRAP`` resamples of the requests (the same
    resample of both when paired), in chunks to bound memory."""
    out = []
    chunk = max(1, 2_000_000 // max(a.size, b.size, 1))
    for start in range(0, BOOTSTRAP, chunk):
        m = min(chunk, BOOTSTRAP - start)
        ia = rng.integers(0, a.size, (m, a.size))
        ib = ia if paired else rng.integers(0, b.size, (m, b.size))
        out.append(np.percentile(b[ib], q, axis=1) - np.percentile(a[ia], q, axis=1))
    return np.concatenate(out)


def latency(
    metric: str, a: np.ndarray, b: np.ndarray, q: float, paired: bool, seed: int = 0
) -> Comparison:
    """The q-th percentile of a latency in both arms (ms), B - A with a bootstrap CI."""
    rng = np.random.default_rng(seed)
    diffs = _bootstrap_diffs(a, b, q, paired, rng)
    low, high = np.percentile(diffs, [2.5, 97.5])
    diff = float(np.percentile(b, q) - np.percentile(a, q))
    n = min(a.size, b.size)
    needed = None
    half = (high - low) / 2.0
    if diff != 0.0 and half > 0:  # the CI narrows as 1/sqrt(n)
        needed = math.ceil(n * ((Z_ALPHA + Z_POWER) / Z_ALPHA * half / abs(diff)) ** 2)
    return Comparison(
        f"{metric} p{q:g} ms ({'paired' if paired else 'split'})",
        float(np.percentile(a, q)),
        float(np.percentile(b, q)),
        float(low),
        float(high),
        None,
        n,
        needed,
        lower_is_better=True,
    )


def compare_paired(records_a: pd.DataFrame, records_b: pd.DataFrame) -> list[Comparison]:
    """Arm A's and arm B's records of the same requests (joined on ``request_id``)."""
    a = records_a.set_index("request_id")
    b = records_b.set_index("request_id").reindex(a.index)
    if b["status"].isna().any():
        missing = list(a.index[b["status"].isna()][:3])
        raise ValueError(f"the arms did not run the same requests (B lacks {missing}, ...)")
    out = [paired_goodput(good(a.reset_index()), good(b.reset_index()))]
    both = (a["status"].astype(str) == "COMPLETED") & (b["status"].astype(str) == "COMPLETED")
    ttft_a = a.loc[both, "ttft_ms"].to_numpy(dtype=float)
    ttft_b = b.loc[both, "ttft_ms"].to_numpy(dtype=float)
    if ttft_a.size:
        out += [latency("TTFT", ttft_a, ttft_b, q, paired=True) for q in (50, 99)]
    return out


def arm_of(records: pd.DataFrame, column: str = "policy") -> pd.Series:
    """Each record's arm, from the ``A:``/``B:`` prefix of ``column``."""
    arms = records[column].astype(str).str.extract(r"^([AB]):", expand=False)
    unplaced = arms.isna() & (records["status"].astype(str) != "COMPLETED")
    return arms.where(~unplaced, other="unplaced")


def compare_split(records: pd.DataFrame, column: str = "policy") -> list[Comparison]:
    """A split run's records; requests that never reached a policy's placement (rejected,
    failed in the queue) count against neither arm."""
    arms = arm_of(records, column)
    a, b = records[arms == "A"], records[arms == "B"]
    if a.empty or b.empty:
        raise ValueError(
            f"no A:/B: arms in column {column!r} (values such as "
            f"{list(records[column].astype(str).unique()[:3])}); run with policy=ab_test"
        )
    out = [split_goodput(good(a), good(b))]
    ttft_a = a.loc[a["status"].astype(str) == "COMPLETED", "ttft_ms"].to_numpy(dtype=float)
    ttft_b = b.loc[b["status"].astype(str) == "COMPLETED", "ttft_ms"].to_numpy(dtype=float)
    out += [latency("TTFT", ttft_a, ttft_b, q, paired=False) for q in (50, 99)]
    return out


def table(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    return pd.DataFrame([c.row() for c in comparisons]).set_index("metric")


def run_paired(a: Sequence[str], b: Sequence[str], common: Sequence[str]) -> list[Comparison]:
    """The same workload (seed and all) under ``common`` + ``a`` and ``common`` + ``b``."""
    from experiments.api import simulate

    records_a = simulate(*common, *a).requests
    records_b = simulate(*common, *b).requests
    return compare_paired(records_a, records_b)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args, common = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="", help="arm A's overrides, e.g. 'policy=fifo'")
    parser.add_argument("--b", default="", help="arm B's overrides")
    parser.add_argument("--records", help="a split run's records (parquet or csv)")
    parser.add_argument("--arm-column", default="policy")
    opts = parser.parse_args(args)
    if opts.records:
        path = str(opts.records)
        records = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
        comparisons = compare_split(records, opts.arm_column)
    else:
        if not (opts.a or opts.b):
            parser.error("give --a and --b (overrides of each arm), or --records")
        comparisons = run_paired(shlex.split(opts.a), shlex.split(opts.b), common)
    out = table(comparisons)
    with pd.option_context("display.width", 200, "display.max_colwidth", 120):
        print(out.to_string())
    return out


if __name__ == "__main__":
    main()
