"""Gateway overhead: the latency ``cpsim serve`` adds in front of an engine, and the rate one
gateway process sustains.

Three processes on loopback. The engine is a stand-in for a vLLM OpenAI server that answers
at once (``experiments/fake_engine.py``): a real engine's time would hide the gateway's. The
gateway is ``cpsim serve`` as users start it (``python -m experiments.serve``), pinned to one
core. The load generator (this process) and the engine share the other core.

- ``overhead``: open-loop Poisson arrivals at each ``--rates`` for ``--requests`` requests,
  sent (a) to the engine directly and (b) through the gateway over the HTTP backend; the same
  non-streaming completion (``--max-tokens`` tokens) each time. The added latency is the
  difference of the two latency percentiles at the same rate.
- ``capacity``: closed loop, ``--concurrency`` clients sending back to back for
  ``--seconds``, through the gateway over the HTTP backend (the stand-in engine), and over
  the simulated backend run 1,000 times faster than real time (a near-instant engine inside
  the gateway's own process, so the engine takes no CPU from the load generator).

Prints one table per part and writes them as CSV with ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as resp:
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _process(
    args: list[str], ready_url: str, core: int | None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (pinned to ``core`` when given) until the block ends."""
    pinned = ["taskset", "-c", str(core), *args] if core is not None else args
    log = Path(tempfile.mkstemp(prefix="gateway-bench-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(pinned, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(ready_url, process)
        yield process  # taskset execs the command: the same pid
    except BaseException:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def engine(port: int, core: int | None) -> Any:
    args = [sys.executable, "-m", "experiments.fake_engine", "--port", str(port)]
    return _process(args, f"http://127.0.0.1:{port}/health", core)


def gateway(port: int, overrides: list[str], core: int | None) -> Any:
    """``cpsim serve`` on ``port`` with Hydra ``overrides``."""
    run_dir = tempfile.mkdtemp(prefix="gateway-bench-hydra-")
    args = [
        sys.executable, "-m", "experiments.serve", *overrides, f"server.port={port}",
        "server.log_level=warning", f"hydra.run.dir={run_dir}",
    ]
    return _process(args, f"http://127.0.0.1:{port}/ready", core)


def http_gateway(port: int, engine_port: int, core: int | None) -> Any:
    endpoint = f"[{{host:127.0.0.1,port:{engine_port},max_model_len:2048}}]"
    overrides = ["backend=vllm_http", "cluster=vllm_endpoints", f"cluster.endpoints={endpoint}"]
    return gateway(port, overrides, core)


def sim_gateway(port: int, core: int | None) -> Any:
    overrides = ["backend=sim", "backend.time_scale=1000", "cluster=vllm_endpoints"]
    return gateway(port, overrides, core)


def _body(max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Say something about control planes.",
            "max_tokens": max_tokens}


async def _one(session: Any, url: str, body: dict[str, Any]) -> float | None:
    """The latency of one request, or None if it was not answered with a 200."""
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            await resp.read()
            ok = resp.status == 200
    except aiohttp.ClientError:
        return None
    return time.perf_counter() - start if ok else None


class _Tally:
    """Latencies of the answered requests, and a count of the others."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0

    def add(self, latency: float | None) -> None:
        if latency is None:
            self.errors += 1
        else:
            self.latencies.append(latency)

    def row(self, quantiles: tuple[int, ...]) -> dict[str, Any]:
        ms = np.array(self.latencies) * 1000.0
        return {
            "ok": len(self.latencies),
            "errors": self.errors,
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in quantiles},
        }


@contextlib.asynccontextmanager
async def _session(url: str, body: dict[str, Any]) -> AsyncIterator[Any]:
    """A client session, its connections and the gateway's code paths warmed first."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(20):
            await _one(session, url, body)
        yield session


async def open_loop(url: str, rate: float, num: int, max_tokens: int, seed: int) -> dict[str, Any]:
    """``num`` requests at Poisson arrivals of ``rate`` a second."""
    rng = random.Random(seed)
    body = _body(max_tokens)
    tally = _Tally()
    async with _session(url, body) as session:

        async def send() -> None:
            tally.add(await _one(session, url, body))

        tasks = []
        loop = asyncio.get_running_loop()
        start = at = loop.time()
        for _ in range(num):
            at += rng.expovariate(rate)
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send()))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    achieved = round(len(tally.latencies) / elapsed, 1)
    return {"offered_rps": rate, "achieved_rps": achieved, **tally.row((50, 90, 99))}


async def closed_loop(
    url: str, concurrency: int, seconds: float, max_tokens: int
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    body = _body(max_tokens)
    tally = _Tally()
    async with _session(url, body) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def client() -> None:
            while loop.time() < start + seconds:
                tally.add(await _one(session, url, body))

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = loop.time() - start
    rps = round(len(tally.latencies) / elapsed, 1)
    return {"concurrency": concurrency, "rps": rps, **tally.row((50, 99))}


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(columns, widths, strict=True))
              for r in rows]
    return "\n".join(lines)


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    engine_port, gateway_port = args.base_port, args.base_port + 1
    direct_url = f"http://127.0.0.1:{engine_port}/v1/completions"
    via_url = f"http://127.0.0.1:{gateway_port}/v1/completions"
    with engine(engine_port, args.client_core), http_gateway(
        gateway_port, engine_port, args.gateway_core
    ):
        for i, rate in enumerate(args.rates):
            direct = asyncio.run(open_loop(direct_url, rate, args.requests, args.max_tokens, i))
            via = asyncio.run(open_loop(via_url, rate, args.requests, args.max_tokens, i))
            for path, result in (("direct", direct), ("gateway", via)):
                rows.append({"path": path, **result})
            rows.append({
                "path": "added", "offered_rps": rate,
                "achieved_rps": via["achieved_rps"], "ok": via["ok"], "errors": via["errors"],
                **{k: round(via[k] - direct[k], 3) for k in ("p50_ms", "p90_ms", "p99_ms")},
            })
            print(_table(rows[-3:]), flush=True)
    return rows


def capacity(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    engine_port, gateway_port = args.base_port + 2, args.base_port + 3
    url = f"http://127.0.0.1:{gateway_port}/v1/completions"

    def measure(backend: str, gateway_pid: int, url: str) -> None:
        for c in args.concurrency:
            before, start = cpu_s(gateway_pid), time.monotonic()
            result = asyncio.run(closed_loop(url, c, args.seconds, args.max_tokens))
            busy_s = cpu_s(gateway_pid) - before
            rows.append({
                "backend": backend, **result,
                # how busy the gateway's core was, and its CPU time per request
                "gateway_cpu_frac": round(busy_s / (time.monotonic() - start), 2),
                "gateway_cpu_ms_per_req": round(1000.0 * busy_s / max(1, result["ok"]), 3),
            })
            print(_table(rows[-1:]), flush=True)

    with engine(engine_port, args.client_core), http_gateway(
        gateway_port, engine_port, args.gateway_core
    ) as served:
        measure("vllm_http (stand-in engine)", served.pid, url)
    with sim_gateway(gateway_port + 1, args.gateway_core) as served:
        url = f"http://127.0.0.1:{gateway_port + 1}/v1/completions"
        measure("sim (time_scale=1000)", served.pid, url)
    return rows


def _numbers(kind: type, text: str) -> list[Any]:
    return [kind(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="overhead,capacity")
    parser.add_argument("--rates", type=lambda s: _numbers(float, s), default=[100, 250, 500])
    parser.add_argument("--requests", type=int, default=3000, help="per rate and path")
    parser.add_argument("--concurrency", type=lambda s: _numbers(int, s), default=[16, 64])
    parser.add_argument("--seconds", type=float, default=10.0, help="per closed-loop run")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--base-port", type=int, default=8300)
    parser.add_argument("--gateway-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="a folder for the CSV tables")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        args.gateway_core = args.client_core = None
    elif args.client_core is not None:
        os.sched_setaffinity(0, {args.client_core})
    parts = {"overhead": overhead, "capacity": capacity}
    for name in args.parts.split(","):
        if name not in parts:
            sys.exit(f"--parts: {name!r} is not one of {sorted(parts)}")
        print(f"== {name}", flush=True)
        rows = parts[name](args)
        print(_table(rows))
        if args.out is not None:
            _write(rows, args.out / f"gateway_{name}.csv")


if __name__ == "__main__":
    main()
