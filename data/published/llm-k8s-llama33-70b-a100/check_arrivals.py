"""Checks the regenerated send times (``convert.arrivals``) against what the source recorded.

    python check_arrivals.py /tmp/llm-k8s     # the folder given to convert.py

1. Server log (TP4xPP2 over IB, the two runs whose vLLM log is published: ``lws-run-1.sh`` is
   ``03_tp4_pp2_IB``, ``lws-run-2.sh`` is ``04_tp4_pp2_IB``). Each "Received request" line has a
   whole-second stamp. The regenerated time t_i fits if one constant c (and, optionally, a
   small clock stretch k) puts every c + t_i*(1+k) inside its logged second. Printed: the
   excess (s) by which the best c misses the tightest request (<= 0: every request fits), for
   the regeneration and for wrong schedules (seed 1; one extra draw / first request after one
   interval).
2. All runs: vLLM streams one token per engine step to every running request, so a slow step
   (a prefill chunk joining the batch) shows as a longer inter-token gap in every request
   running at that moment. With the right send times those gaps line up across requests in
   absolute time; printed is the share that has another request's gap within 1 ms, with the
   regeneration and with wrong schedules (seeds 1-5).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from convert import SETUPS, arrivals, results_dir

STAMP = re.compile(r"^INFO (\d\d-\d\d \d\d:\d\d:\d\d) \[logger.py:39\] Received request cmpl-")


def misfit(s: np.ndarray, t: np.ndarray, stretch: bool) -> tuple[float, float]:
    """(excess, stretch): how far the best offset c misses putting every c + t*(1+stretch)
    inside its logged second s (<= 0: all fit), searching stretches within +-2 %."""
    best = (np.inf, 0.0)
    for kk in np.linspace(-0.02, 0.02, 801) if stretch else [0.0]:
        lo, hi = np.max(s - t * (1 + kk)), np.min(s + 1 - t * (1 + kk))
        best = min(best, (lo - hi, kk))
    return best


def server_log_check(folder: Path) -> None:
    print("1. server-log seconds: misfit (s) of the best offset, without / with a clock stretch")
    for log, setup in (("lws-run-1.sh", "03_tp4_pp2_IB"), ("lws-run-2.sh", "04_tp4_pp2_IB")):
        stamps = [
            datetime.strptime("2025-" + m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            for m in map(STAMP.match, (folder / log).read_text(errors="replace").splitlines())
            if m
        ]
        for k, tag in enumerate(("01", "04", "16")):  # the runs went 1, 4, 16, inf
            s = np.array(stamps[k * 201 + 1 : (k + 1) * 201])  # skip the initial test request
            s -= s[0]
            rate = float(tag)

            regen = arrivals(rate, 200)
            ours0, ours = misfit(s, regen, False), misfit(s, regen, True)
            rng = np.random.RandomState(0)
            sums = np.cumsum([rng.gamma(1.0, 1.0 / rate) for _ in range(200)])
            extra = sums - sums[0]  # gaps one draw later: the first request after one interval
            print(
                f"   {setup} qps{tag}: regenerated {ours0[0]:+.3f} / {ours[0]:+.3f} "
                f"(stretch {ours[1] * 100:+.2f} %); seed 1 "
                f"{misfit(s, arrivals(rate, 200, seed=1), True)[0]:+.2f}; "
                f"one draw off {misfit(s, extra, True)[0]:+.2f}"
            )


def coincidence(data: dict, t: np.ndarray, tol: float = 0.001, thr: float = 1.15):
    slow = []
    for i, gaps in enumerate(data["itls"]):
        g = np.asarray(gaps)
        if len(g) < 10:
            slow.append(np.array([]))
            continue
        ends = t[i] + data["ttfts"][i] + np.cumsum(g)
        slow.append(ends[g > thr * np.median(g)])
    every = np.concatenate(slow)
    owner = np.concatenate([[i] * len(x) for i, x in enumerate(slow)])
    hits = total = 0
    for i, x in enumerate(slow):
        if not len(x):
            continue
        other = np.sort(every[owner != i])
        k = np.clip(np.searchsorted(other, x), 1, len(other) - 1)
        dist = np.minimum(np.abs(other[k] - x), np.abs(other[k - 1] - x))
        hits += int(np.sum(dist <= tol))
        total += len(x)
    return hits / total, total


def gap_alignment_check(folder: Path) -> None:
    print("2. slow-step gaps that line up across requests (within 1 ms)")
    print("   | run | slow gaps | regenerated | wrong schedules, seeds 1-5 |")
    for setup, (name, stem) in SETUPS.items():
        for tag in ("01", "04", "16"):
            data = json.loads((folder / setup / f"{stem}{tag}.json").read_text())
            share, n = coincidence(data, arrivals(float(tag), 200))
            ctl = [coincidence(data, arrivals(float(tag), 200, seed=s))[0] for s in range(1, 6)]
            print(
                f"   | {name}-qps{tag.lstrip('0')} | {n} | {share * 100:.0f} % | "
                f"{np.mean(ctl) * 100:.0f} % ({min(ctl) * 100:.0f}-{max(ctl) * 100:.0f}) |"
            )


if __name__ == "__main__":
    src = results_dir(Path(sys.argv[1]))
    server_log_check(src)
    gap_alignment_check(src)
