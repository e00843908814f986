"""Sweeps on a Ray cluster: Hydra's Ray launcher runs a sweep's jobs on a running Ray head (here
one started on loopback by the test and stopped by it) and the sweep's table,
``<sweep dir>/runs.parquet``, is written as with any launcher (docs/sweeps.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.compare import load_runs
from experiments.schema import register

pytest.importorskip("ray")
pytest.importorskip("hydra_plugins.hydra_ray_launcher")

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")  # the CLI of the Ray the tests import
#: Ray resolves 127.0.0.1 to the machine's routable address and listens on every interface,
#: unless clusters are off (its Windows and macOS default): then it keeps to loopback. The head
#: and the sweep's driver both need it, or the driver looks for the head on the other address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0  # the head drains for up to 30 s on SIGTERM (3-4 s here)

register()


@dataclass(frozen=True)
class RayHead:
    address: str
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pids(*pgrep_args: str) -> list[int]:
    out = subprocess.run(["pgrep", *pgrep_args], capture_output=True, text=True, check=False)
    return [int(pid) for pid in out.stdout.split()]


def _left_over(session: int, temp_dir: str) -> list[int]:
    """The head's processes still alive: its session (workers included) and any process, in
    whatever session, that runs from its temp dir (gcs_server, raylet, the agents)."""
    return sorted(set(_pids("-s", str(session))) | set(_pids("-f", temp_dir)))


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    """A one-node Ray cluster on loopback, in its own session; stopped, and checked gone, after.

    ``ray stop`` is not used: it ends every Ray process on the machine, whoever started them.
    ``ray start --block`` stops the processes it started when it gets SIGTERM."""
    if shutil.which("pgrep") is None or not RAY.is_file():
        pytest.skip("needs pgrep and the ray CLI next to the interpreter")
    # Unix sockets live under the temp dir and their paths may not exceed 107 characters:
    # tmp_path is too deep, so a short dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_ENV
    log = tmp_path / "ray-head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--ray-client-server-port={_free_port()}",  # else 10001, shared by all heads
                "--num-cpus=2",
                "--include-dashboard=false",
                "--object-store-memory=100000000",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
            ],
            cwd=tmp_path,  # the jobs' working dir: nothing strays into the repository
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield RayHead(f"127.0.0.1:{port}", env)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        deadline = time.monotonic() + 10.0
        while (left := _left_over(head.pid, temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:  # only this head's: its session, its temp dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left after the head stopped: {left}"


def test_the_ray_cluster_preset_joins_a_cluster_without_sizing_it() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=h:1"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher.ray.init.address == "h:1"
    # set, as null: the plugin would otherwise set 75 MB, which ray.init refuses with an address
    assert "object_store_memory" in launcher.ray.init
    assert launcher.ray.init.object_store_memory is None


@pytest.mark.slow
def test_a_sweep_on_a_ray_cluster_lands_in_one_table(ray_head: RayHead, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"  # absolute: a relative one is taken from the jobs' cwd
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "-m",
            "hydra/launcher=ray_cluster",
            f"hydra.launcher.ray.init.address={ray_head.address}",
            "policy=fifo,slo_aware",
            "workload.duration_s=20",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-3000:]
    assert "Ray Launcher is launching 2 jobs" in logs
    assert f"Connecting to existing Ray cluster at address: {ray_head.address}" in logs
    assert sorted(p.parent.name for p in sweep_dir.rglob("summary.json")) == ["0", "1"]
    assert (sweep_dir / "runs.parquet").is_file()
    runs = load_runs(sweep_dir)
    assert len(runs) == 2
    assert set(runs["policy"]) == {"fifo", "slo_aware"}
    assert (runs["goodput_rps"] > 0).all()
    assert runs["run_dir"].map(lambda d: Path(d).parent == sweep_dir).all()
