"""Simulator cost in CPU instructions per simulated request, counted by valgrind.

Wall-clock rates on a shared VM drift by 20-30 % within minutes, more than most single
optimisations change them; an instruction count does not drift. This runs the setup of
``sim_speed.py`` (same cluster, lengths and load) under ``valgrind --tool=callgrind`` at
two sizes and reports (instructions at the larger - at the smaller) / (the difference in
requests): per-request cost, with imports, trace loading and start-up cancelled out. It
compares two builds or two commits; it does not predict wall time (instructions differ in
cost, and valgrind's cache model is not used).

Needs valgrind on PATH (``apt install valgrind``); under it Python runs ~50x slower, so
the default sizes (2,000 and 6,000 requests on 8 replicas) take 2-4 minutes."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
#: Per-replica capacity of sim_speed's setup (req/s), as calibrated there; fixed here so
#: that both runs simulate the same arrival stream without a calibration under valgrind.
CAPACITY_RPS = 2.409

_CHILD = """
import sys
sys.path.insert(0, {here!r})
import sim_speed
sim_speed.run_one({requests}, {replicas}, {rate}, None)
"""


def count_instructions(requests: int, replicas: int, load: float) -> int:
    """Instructions executed by a fresh Python process that simulates ``requests``."""
    code = _CHILD.format(
        here=str(HERE), requests=requests, replicas=replicas,
        rate=load * CAPACITY_RPS * replicas,
    )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, "-c", code],
            capture_output=True, text=True, cwd=REPO,
        )
    if proc.returncode:
        raise RuntimeError(f"the run under valgrind failed:\n{proc.stderr[-2000:]}")
    match = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", default="2000,6000",
                        help="two comma-separated sizes, smaller first")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.requests.split(",")]
    if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
        raise SystemExit(f"--requests={args.requests!r}: give two sizes, smaller first")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH; install it (apt install valgrind)")
    sys.path.insert(0, str(HERE))
    from sim_speed import build_kind

    small, large = (count_instructions(n, args.replicas, args.load) for n in sizes)
    per_request = (large - small) / (sizes[1] - sizes[0])
    print(f"build={build_kind()} replicas={args.replicas} requests={sizes[0]},{sizes[1]} "
          f"instructions={small},{large} per_request={per_request:.0f}")


if __name__ == "__main__":
    main()
