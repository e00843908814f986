"""Converts the vLLM 0.8.3 ``benchmark_serving.py`` result JSONs that surajssd/llm-k8s published
for Llama-3.3-70B-Instruct on Azure ND96asr_v4 (A100-40GB) into the per-request CSV logs next to
this script: one row per request, in the order the client sent them.

    git --git-dir=LLM_K8S_GIT archive 58b61c59450e06073120a8ad166c1e9c333851a7 \
        results_serving_meta-llama-Llama-3.3-70B-Instruct | tar -x -C /tmp/llm-k8s
    python convert.py /tmp/llm-k8s            # or the results folder itself, or a checkout
    python convert.py /tmp/llm-k8s --table    # also print the README's summary table

The JSONs hold, per request in send order, ``input_lens``, ``output_lens`` (the server's
``usage.completion_tokens``), ``ttfts`` (s) and ``itls`` (s, one gap per streamed chunk after
the first) and ``errors``; they hold no send times. ``issue_time_s`` is therefore a
*regeneration* of the client's Poisson schedule (see ``arrivals`` and the README), not a record.
``max_tokens`` (the cap the client asked for, the ShareGPT reply's token count) is read from the
server's request log ``lws-run-1.sh``, which the source publishes for one TP4xPP2 run; the
sampled request list is the same in every run (same seed, same file, checked below).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # run as a script from anywhere
from experiments.vllm_bench import client_arrivals

RESULTS = "results_serving_meta-llama-Llama-3.3-70B-Instruct"
MODEL = "meta-llama-Llama-3.3-70B-Instruct"
# source folder -> (our name prefix, file stem inside the folder)
SETUPS = {
    "01_tp8_pp1": ("tp8", f"serving_{MODEL}_tp8_pp1_sharegpt_qps_"),
    "02_tp4_pp2_no_IB": ("tp4pp2-noib", f"serving_{MODEL}_tp4_pp2_sharegpt_qps_"),
    "03_tp4_pp2_IB": ("tp4pp2-ib", f"serving_{MODEL}_tp4_pp2_sharegpt_qps_"),
    "04_tp4_pp2_IB": ("tp4pp2-ibgdr", f"serving_{MODEL}_tp4_pp2_sharegpt_qps_"),
}
RATES = {"01": 1.0, "04": 4.0, "16": 16.0, "inf": math.inf}
SEED = 0  # benchmark_serving.py --seed default (the logged Namespace says seed=0)
BURSTINESS = 1.0  # --burstiness default (logged: burstiness=1.0, Poisson)
COLUMNS = [
    "issue_time_s",
    "prompt_len",
    "output_len",
    "ttft_ms",
    "tpot_ms",
    "latency_ms",
    "max_tokens",
]


def arrivals(rate: float, n: int, seed: int = SEED, burstiness: float = BURSTINESS) -> np.ndarray:
    """Send times (s from the first request) as the vLLM 0.8.3 client schedules them.

    The client seeds NumPy's global legacy generator with the seed before anything else, and
    nothing draws from it before the schedule (ShareGPT sampling shuffles with Python's
    ``random``). It sends request 0 at once and, after sending request i, sleeps one gamma
    (shape=burstiness, scale=1/(rate*burstiness)) interval before request i+1: a new draw per
    request, the first request at time 0 (``experiments.vllm_bench``'s ``sequential``
    schedule, which ``experiments.replay`` uses for such files). Rate inf: every request at 0.
    """
    return client_arrivals(n, rate, burstiness, seed, "sequential")


def results_dir(path: Path) -> Path:
    for candidate in (path, path / RESULTS):
        if (candidate / "01_tp8_pp1").is_dir():
            return candidate
    raise SystemExit(f"{path}: no {RESULTS}/01_tp8_pp1 folder here")


LOG_LINE = re.compile(
    r"Received request cmpl-\S+: prompt: .*?max_tokens=(\d+),.*?"
    r"prompt_token_ids: \[([^\]]*)\]"
)


def requested_caps(folder: Path, input_lens: list[int]) -> list[int | None]:
    """max_tokens per request from the server log (its first benchmark run, rate 1: the
    initial test request, then the 200 in send order); None where the log is missing."""
    log = folder / "lws-run-1.sh"
    if not log.exists():
        return [None] * len(input_lens)
    seen = [
        (int(m.group(1)), len(m.group(2).split(",")))
        for m in map(LOG_LINE.search, log.read_text(errors="replace").splitlines())
        if m
    ]
    run = seen[1 : 1 + len(input_lens)]  # skip the client's initial single-prompt test
    if [p for _, p in run] != input_lens:
        raise SystemExit(f"{log}: the logged prompt lengths are not the results' input_lens")
    return [c for c, _ in run]


def rows(data: dict, issue: np.ndarray, caps: list[int | None]) -> list[list[object]]:
    out = []
    for i, (prompt, output, ttft, itl, err) in enumerate(
        zip(
            data["input_lens"],
            data["output_lens"],
            data["ttfts"],
            data["itls"],
            data.get("errors") or [""] * len(data["input_lens"]),
            strict=True,
        )
    ):
        if err or ttft is None:  # a failed request (none in these files)
            continue
        decode_s = float(sum(itl))
        # vLLM's TPOT: (last chunk - first chunk) / (output_len - 1). It equals mean(itl)
        # whenever each chunk carries one token (all but 25 requests of tp8-qps4).
        tpot = f"{decode_s / (output - 1) * 1e3:.4f}" if output > 1 else ""
        out.append(
            [
                f"{issue[i]:.6f}",
                prompt,
                output,
                f"{ttft * 1e3:.4f}",
                tpot,
                f"{(ttft + decode_s) * 1e3:.4f}",
                "" if caps[i] is None else caps[i],
            ]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="results folder, its parent, or a checkout")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--table", action="store_true", help="print the README summary table")
    args = ap.parse_args()
    folder = results_dir(args.source)

    reference = None
    table = []
    for setup, (name, stem) in SETUPS.items():
        for tag, rate in RATES.items():
            data = json.loads((folder / setup / f"{stem}{tag}.json").read_text())
            n = len(data["input_lens"])
            if reference is None:
                reference = data["input_lens"]
                caps = requested_caps(folder, reference)
            if data["input_lens"] != reference:
                raise SystemExit(f"{setup} {tag}: a different request list than the others")
            logged_rate = data["request_rate"]
            if (logged_rate == "inf") != math.isinf(rate) or (
                not math.isinf(rate) and float(logged_rate) != rate
            ):
                raise SystemExit(f"{setup} {tag}: request_rate {logged_rate!r}")
            if data.get("burstiness", 1.0) != BURSTINESS:
                raise SystemExit(f"{setup} {tag}: burstiness {data['burstiness']}")
            out = rows(data, arrivals(rate, n), caps)
            csv_name = f"{name}-qps{tag.lstrip('0')}.csv"
            with open(args.out / csv_name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                w.writerows(out)
            table.append((csv_name, data, out))
            print(f"{csv_name}: {len(out)} of {n} requests", file=sys.stderr)

    if args.table:
        print_table(table)


def print_table(table) -> None:
    head = (
        "| file | req | mean in | mean out | req/s | out tok/s | TTFT p50 | TTFT p90 | "
        "TPOT p50 | TPOT p90 | JSON med TTFT | JSON med TPOT | JSON p99 TTFT / ours |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, data, out in table:
        ttft = np.array([float(r[3]) for r in out])
        tpot = np.array([float(r[4]) for r in out if r[4] != ""])
        p = lambda v, q: float(np.percentile(v, q))  # noqa: E731
        print(
            f"| `{name}` | {len(out)} | {np.mean([r[1] for r in out]):.1f} | "
            f"{np.mean([r[2] for r in out]):.1f} | {data['request_throughput']:.3f} | "
            f"{data['output_throughput']:.1f} | {p(ttft, 50):.2f} | {p(ttft, 90):.2f} | "
            f"{p(tpot, 50):.2f} | {p(tpot, 90):.2f} | {data['median_ttft_ms']:.2f} | "
            f"{data['median_tpot_ms']:.2f} | {data['p99_ttft_ms']:.2f} / {p(ttft, 99):.2f} |"
        )


if __name__ == "__main__":
    main()
