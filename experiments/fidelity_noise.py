"""How much two real runs of one fidelity workload differ: the noise floor of the report.

    python -m experiments.fidelity_noise outputs/fidelity/A outputs/fidelity/B --out DIR

A and B are two ``experiments.fidelity`` reports of the same runs (same ``--rates``, seed and
lengths). The table gives B's real runs relative to A's, in the report's metrics, and beside
them the simulator's error against each. A simulator cannot be expected to predict a real run
more closely than the real engine repeats itself on the same machine."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from experiments.fidelity_tables import compare, errors_pct, markdown


def real_runs(report: Path) -> dict[str, tuple[float, float, pd.DataFrame]]:
    """A report's real runs: label -> (rate, load fraction, records)."""
    table = pd.read_csv(report / "fidelity.csv").drop_duplicates("run").set_index("run")
    return {label: (float(table.rate_rps[label]), float(table.load_frac[label]),
                    pd.read_parquet(report / f"real-{label}.parquet")) for label in table.index}


def real_vs_real(first: Path, second: Path) -> pd.DataFrame:
    """Rows as in fidelity.csv, with ``sim`` holding the second report's real value."""
    a, b = real_runs(first), real_runs(second)
    if sorted(a) != sorted(b):
        raise ValueError(f"the reports ran different runs: {sorted(a)} and {sorted(b)}")
    rows = []
    for label, (rate, frac, real_a) in a.items():
        if abs(b[label][0] - rate) > 1e-6 * max(rate, 1.0):
            raise ValueError(f"run {label!r} ran at {rate} req/s in {first} and at "
                             f"{b[label][0]} req/s in {second}; the rates must match")
        rows += compare(label, rate, frac, real_a, b[label][2])
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(prog="python -m experiments.fidelity_noise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    table = real_vs_real(args.first, args.second)
    table.to_csv(args.out / "real_vs_real.csv", index=False)
    sims = [pd.read_csv(d / "fidelity.csv") for d in (args.first, args.second)]
    md = [f"# Real vs real: {args.second} against {args.first}", "",
          "## The second real run relative to the first, % ((second - first) / first)", "",
          markdown(errors_pct(table)), ""]
    for d, sim in zip((args.first, args.second), sims, strict=True):
        md += [f"## The simulator against the real runs of {d}, %", "",
               markdown(errors_pct(sim)), ""]
    (args.out / "real_vs_real.md").write_text("\n".join(md))
    print("\n".join(md))
    return table


if __name__ == "__main__":
    main()
