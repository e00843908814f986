"""Converts DistServe's published per-request logs (``.exp`` files: a Python-literal list of
records, then a summary) into the CSV files next to this script, one row per request in issue
order, times rebased to the first issue.

    python convert.py DISTSERVE_CHECKOUT   # at commit 20a1633ed6f2be5f456d84d1c283865c3e5112d5
"""

from __future__ import annotations

import ast
import csv
import sys
from pathlib import Path

LOGS = "simdistserve/benchmarks/alignment/data-ground-truth/opt-13b-sharegpt"
RUNS = [f"distserve-c21d11-300-{r}" for r in ("3", "4.5", "6", "7.5", "9", "10.5", "12")] + [
    f"vllm-{n}-{r}"
    for n, r in (("100", "1"), ("150", "1.5"), ("200", "2"), ("250", "2.5"), ("300", "3"),
                 ("350", "3.5"), ("400", "4"))
]  # fmt: skip
COLUMNS = ["issue_time_s", "prompt_len", "output_len", "ttft_ms", "tpot_ms", "latency_ms"]


def main(checkout: Path) -> None:
    for run in RUNS:
        first_line = (checkout / LOGS / f"{run}.exp").read_text().splitlines()[0]
        records = sorted(ast.literal_eval(first_line), key=lambda r: r["issue_time"])
        start = records[0]["issue_time"]
        with open(Path(__file__).with_name(f"{run}.csv"), "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(COLUMNS)
            for r in records:
                out.writerow([
                    f"{r['issue_time'] - start:.6f}", r["prompt_len"], r["output_len"],
                    f"{r['ttft_ms']:.4f}", f"{r['tpot_ms']:.4f}", f"{r['latency_ms']:.4f}",
                ])  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
