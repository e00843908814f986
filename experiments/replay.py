"""Replays published per-request logs of a real serving system in the simulator and tables
how far the simulation lands from what the system measured, per log (one request rate each).

    python -m experiments.replay LOG [LOG ...] [--columns ...] [--out DIR] -- OVERRIDE ...

A log is a CSV, JSON (a list of records) or JSONL file with one row per request: its arrival
(issue) time, prompt and output lengths, and the TTFT and TPOT the system measured.
``--columns`` maps those to the log's own names (defaults: issue_time_s, prompt_len,
output_len, ttft_ms, tpot_ms); ``--time-unit ms`` when arrivals are in milliseconds. The
result file of vLLM's own benchmark (``vllm bench serve --save-result --save-detailed``) is
read as it is (``experiments/vllm_bench.py``; ``--vllm-schedule`` where it has no send times).
The requests arrive in the simulator at the logged times (rebased to the first), ask for
exactly the logged output (as the benchmarks' ``ignore_eos``), and run on the cluster composed
from ``conf/`` by the overrides after ``--`` (e.g. ``cluster=distserve_opt13b pd=threshold``).
Each log runs on a fresh cluster, unless ``--back-to-back``: the logs run one after another
on one cluster, as a benchmark sends its rates to one server; with ``--same-prompts`` (row i
of every log is the same prompt) the server's prefix cache keeps what the earlier logs left.

Per log: the real and simulated p50/p90 TTFT and TPOT and their relative errors, the median
per-request error, and the SLO attainment of both (TTFT < ``--slo-ttft-ms`` and TPOT <
``--slo-tpot-ms``; a one-token answer has no TPOT and meets that part) with their
difference in points. ``docs/replay.md`` has the tables for DistServe's published logs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cpsim.types import RequestMetadata
from experiments import vllm_bench
from experiments.api import compose_config, split_overrides
from experiments.build import build_run

FIELDS = ("arrival", "prompt", "output", "ttft", "tpot")
DEFAULT_COLUMNS = {
    "arrival": "issue_time_s",
    "prompt": "prompt_len",
    "output": "output_len",
    "ttft": "ttft_ms",
    "tpot": "tpot_ms",
}
PERCENTILES = (50, 90)
# between two logs sent to one server: the benchmark client's own gap is not logged
BACK_TO_BACK_GAP_S = 5.0


def read_log(
    path: Path,
    columns: dict[str, str],
    time_unit: str = "s",
    vllm_schedule: str | None = None,
    vllm_seed: int = 0,
) -> pd.DataFrame:
    """A log as one row per request in arrival order: arrival_s (from 0), prompt, output,
    ttft_ms, tpot_ms. A vLLM benchmark result (``vllm bench serve --save-detailed``) is read
    as such (``experiments.vllm_bench``; ``columns`` and ``time_unit`` do not apply), its
    failed requests left out and counted in ``log.attrs["failed"]``."""
    if path.suffix == ".csv":
        raw = pd.read_csv(path)
    elif path.suffix == ".jsonl":
        raw = pd.read_json(path, lines=True)
        if all(key in raw for key in vllm_bench.PER_REQUEST):
            raise ValueError(
                f"{path}: {len(raw)} vLLM benchmark results, one a line (--append-result); "
                "give each its own .json file"
            )
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        if vllm_bench.is_result(data):
            log, failed = vllm_bench.read_result(path, data, vllm_schedule, vllm_seed)
            return in_arrival_order(log, failed)
        raw = pd.DataFrame(data)
    else:
        raise ValueError(f"{path}: a log must be .csv, .json or .jsonl, not {path.suffix!r}")
    missing = [f"{field}={name}" for field, name in columns.items() if name not in raw]
    if missing:
        raise ValueError(
            f"{path}: no column for {', '.join(missing)}; its columns are {list(raw.columns)} "
            "(map them with --columns field=name,...)"
        )
    scale = {"s": 1.0, "ms": 1e-3}[time_unit]
    log = pd.DataFrame(
        {
            "arrival_s": raw[columns["arrival"]].astype(float) * scale,
            "prompt": raw[columns["prompt"]].astype(int),
            "output": raw[columns["output"]].astype(int),
            "ttft_ms": raw[columns["ttft"]].astype(float),
            "tpot_ms": raw[columns["tpot"]].astype(float),
        }
    )
    return in_arrival_order(log)


def in_arrival_order(log: pd.DataFrame, failed: int = 0) -> pd.DataFrame:
    log = log.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    log["arrival_s"] -= log["arrival_s"].iloc[0]
    log.attrs["failed"] = failed
    return log


def simulate_log(log: pd.DataFrame, overrides: Sequence[str]) -> pd.DataFrame:
    """The logged requests run in the composed cluster; the sim's records, in log order."""
    return simulate_logs([log], overrides)[0]


def prompt_ids(row: int, length: int) -> tuple[int, ...]:
    """Token ids standing for the prompt of a log's ``row``: the same for that row in every
    log and sharing no block with another row's, so a prompt sent again hits the prefix
    cache as far as its full blocks go, as on the real server."""
    rng = random.Random(row)
    return tuple(rng.randrange(1, 32_000) for _ in range(length))


def simulate_logs(
    logs: Sequence[pd.DataFrame], overrides: Sequence[str], same_prompts: bool = False
) -> list[pd.DataFrame]:
    """Each log's requests run in one composed cluster, the logs one after another as a
    benchmark run against one server sends them (each starts ``BACK_TO_BACK_GAP_S`` after
    the last request of the one before it ended on the real server, and the sim checks its
    own had ended by then). ``same_prompts``: row i of every log is the same prompt (the
    logs of one benchmark at several rates), so a server that keeps its prefix cache
    reuses the earlier runs' blocks. The sim's records per log, in log order."""
    setup = build_run(compose_config(*overrides))
    requests, starts = [], []
    offset = 0.0
    for k, log in enumerate(logs):
        starts.append(offset)
        for i, row in enumerate(log.itertuples(index=False)):
            prompt = int(row.prompt)
            meta = RequestMetadata(
                f"l{k}r{i}",
                max_tokens=int(row.output),
                num_prompt_tokens=None if same_prompts else prompt,
                prompt_token_ids=prompt_ids(i, prompt) if same_prompts else None,
            )
            requests.append((offset + float(row.arrival_s), meta))
        offset += real_end_s(log) + BACK_TO_BACK_GAP_S
    records = setup.simulation.run(iter(requests), total=len(requests)).requests
    records = records.set_index("request_id")
    out = []
    for k, log in enumerate(logs):
        sim = records.loc[[f"l{k}r{i}" for i in range(len(log))]]
        if k + 1 < len(logs):
            ended = float(sim["finish_time_s"].max())
            if ended > starts[k + 1]:
                raise RuntimeError(
                    f"log {k}'s simulated requests ran until {ended:.1f} s, past the next "
                    f"log's start at {starts[k + 1]:.1f} s: the simulated server is far slower "
                    "than the real one, so the logs cannot run one after another"
                )
        out.append(sim)
    return out


def real_end_s(log: pd.DataFrame) -> float:
    """When the log's last request ended on the real server, from its first arrival."""
    output = log["output"].to_numpy()
    decode_ms = log["tpot_ms"].fillna(0.0).to_numpy() * np.maximum(output - 1, 0)
    return float((log["arrival_s"] + (log["ttft_ms"] + decode_ms) / 1e3).max())


def attainment(ttft_ms: pd.Series, tpot_ms: pd.Series, output: pd.Series,
               slo_ttft_ms: float, slo_tpot_ms: float) -> float:
    """% of requests with TTFT < the TTFT SLO and TPOT < the TPOT SLO (strict, as DistServe
    counts; a request that failed has no TTFT and misses)."""
    tpot = tpot_ms.where(output > 1, 0.0).fillna(np.inf)
    met = (ttft_ms.fillna(np.inf) < slo_ttft_ms) & (tpot < slo_tpot_ms)
    return 100.0 * float(met.mean())


def compare(name: str, log: pd.DataFrame, sim: pd.DataFrame, slo_ttft_ms: float,
            slo_tpot_ms: float) -> dict[str, object]:
    """One table row: the log's rate, real vs simulated percentiles and attainment."""
    span_s = float(log["arrival_s"].iloc[-1])
    row: dict[str, object] = {"log": name, "requests": len(log),
                              "rate_rps": (len(log) - 1) / span_s if span_s > 0 else np.nan}
    sim_ttft = pd.Series(sim["ttft_ms"].to_numpy(float))
    sim_tpot = pd.Series(sim["tpot_ms"].to_numpy(float))
    completed = sim["status"].astype(str).eq("COMPLETED").to_numpy()
    row["sim_completed"] = int(completed.sum())
    for metric, real, simulated in (("ttft", log["ttft_ms"], sim_ttft),
                                    ("tpot", log["tpot_ms"], sim_tpot)):
        keep = log["output"].to_numpy() > 1 if metric == "tpot" else np.ones(len(log), bool)
        real_v = real.to_numpy(float)[keep]
        sim_v = simulated.to_numpy(float)[keep & completed]
        for q in PERCENTILES:
            r, s = float(np.percentile(real_v, q)), float(np.nanpercentile(sim_v, q))
            row[f"{metric}_p{q}_real_ms"] = r
            row[f"{metric}_p{q}_sim_ms"] = s
            row[f"{metric}_p{q}_err_%"] = 100.0 * (s - r) / r
        both = keep & completed
        per_request = np.abs(simulated.to_numpy(float)[both] - real.to_numpy(float)[both])
        row[f"{metric}_median_abs_err_%"] = float(
            np.median(100.0 * per_request / np.maximum(real.to_numpy(float)[both], 1e-9))
        )
    real_att = attainment(log["ttft_ms"], log["tpot_ms"], log["output"], slo_ttft_ms, slo_tpot_ms)
    sim_att = attainment(sim_ttft, sim_tpot, log["output"], slo_ttft_ms, slo_tpot_ms)
    row.update(attain_real_pct=real_att, attain_sim_pct=sim_att, attain_diff_pts=sim_att - real_att)
    return row


TABLE = {
    "rate_rps": "rate req/s",
    "attain_real_pct": "SLO % real",
    "attain_sim_pct": "SLO % sim",
    "attain_diff_pts": "diff pts",
    "ttft_p50_err_%": "TTFT p50 err %",
    "ttft_p90_err_%": "TTFT p90 err %",
    "tpot_p50_err_%": "TPOT p50 err %",
    "tpot_p90_err_%": "TPOT p90 err %",
    "ttft_median_abs_err_%": "TTFT median per-request abs err %",
    "tpot_median_abs_err_%": "TPOT median per-request abs err %",
}


def markdown(table: pd.DataFrame) -> str:
    shown = table[["log", *TABLE]].rename(columns=TABLE)
    head = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    rows = [
        "| " + " | ".join(v if isinstance(v, str) else f"{v:.1f}" for v in r) + " |"
        for r in shown.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])


def parse_columns(text: str) -> dict[str, str]:
    columns = dict(DEFAULT_COLUMNS)
    for item in filter(None, text.split(",")):
        field, _, name = item.partition("=")
        if field not in FIELDS or not name:
            raise SystemExit(f"--columns {item!r}: give field=name with field one of {FIELDS}")
        columns[field] = name
    return columns


def main(argv: Sequence[str]) -> pd.DataFrame:
    args_part, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path)
    fields = ", ".join(FIELDS)
    p.add_argument("--columns", default="", help=f"field=name,... (fields: {fields})")
    p.add_argument("--time-unit", choices=("s", "ms"), default="s")
    p.add_argument("--vllm-schedule", choices=vllm_bench.SCHEDULES, default=None,
                   help="a vLLM benchmark result without start_times: regenerate its send "
                   "times as the client of that vLLM did (experiments/vllm_bench.py)")
    p.add_argument("--vllm-seed", type=int, default=0, help="the benchmark client's --seed")
    p.add_argument("--slo-ttft-ms", type=float, default=200.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=None, help="write replay.csv and replay.md here")
    p.add_argument("--back-to-back", action="store_true",
                   help="run the logs one after another on one cluster, in the order given")
    p.add_argument("--same-prompts", action="store_true",
                   help="row i of every log is the same prompt (implies --back-to-back): a "
                   "prompt sent again hits the prefix cache as on the real server")  # fmt: skip
    args = p.parse_args(args_part)
    columns = parse_columns(args.columns)
    logs = [
        read_log(path, columns, args.time_unit, args.vllm_schedule, args.vllm_seed)
        for path in args.logs
    ]
    for path, log in zip(args.logs, logs, strict=True):
        if log.attrs["failed"]:
            print(f"{path}: left out {log.attrs['failed']} failed request(s), replaying {len(log)}")
    if args.back_to_back or args.same_prompts:
        sims = simulate_logs(logs, overrides, same_prompts=args.same_prompts)
    else:
        sims = [simulate_log(log, overrides) for log in logs]
    rows = [
        compare(path.stem, log, sim, args.slo_ttft_ms, args.slo_tpot_ms)
        for path, log, sim in zip(args.logs, logs, sims, strict=True)
    ]
    table = pd.DataFrame(rows).sort_values("rate_rps", kind="stable", ignore_index=True)
    text = markdown(table)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "replay.csv", index=False)
        command = "python -m experiments.replay " + " ".join(map(str, argv))
        (args.out / "replay.md").write_text(f"`{command}`\n\n{text}\n")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
