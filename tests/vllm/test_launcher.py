"""The launcher starts real vLLM servers from the cluster config and stops them without a trace."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from backends.vllm.launcher import LaunchedEngine, group_pids, launch, plan, stop

pytestmark = pytest.mark.vllm


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _with_port(port: int) -> list[int]:
    """Processes whose command line holds ``--port <port>``."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in args and args[args.index(b"--port") + 1 : args.index(b"--port") + 2] == [
            str(port).encode()
        ]:
            out.append(int(entry.name))
    return [p for p in out if not _gone(p)]


def test_plan_turns_the_cluster_config_into_commands(make_cluster_config: Any) -> None:
    cfg = make_cluster_config(base_port=9000, kv_shared_storage_path="/tmp/kv", log_dir="/tmp/l")
    engines = plan(cfg)
    assert [e.instance.instance_id for e in engines] == ["engine-0", "engine-1"]
    assert [e.instance.port for e in engines] == [9000, 9001]
    assert [e.env["VLLM_CPU_OMP_THREADS_BIND"] for e in engines] == ["0", "1"]
    assert all(e.env["VLLM_CPU_KVCACHE_SPACE"] == "1" for e in engines)
    cmd = engines[0].command
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1].endswith("conf/vllm_model/tiny-llama")
    assert cmd[cmd.index("--load-format") + 1] == "dummy"
    assert cmd[cmd.index("--max-model-len") + 1] == "2048"
    assert "--skip-tokenizer-init" in cmd and "--enforce-eager" in cmd
    assert '"ExampleConnector"' in cmd[cmd.index("--kv-transfer-config") + 1]
    assert engines[1].instance.metadata["vocab_size"] == 32000
    # the server serves the name the instance is registered under (what clients ask for)
    assert cmd[cmd.index("--served-model-name") + 1] == engines[0].instance.model_name
    assert engines[0].instance.model_name == "tiny-llama"
    assert engines[0].instance.metadata["max_model_len"] == 2048


def test_launched_servers_answer_in_their_own_process_groups_on_their_own_cores(
    http_engines: list[LaunchedEngine],
) -> None:
    cores = []
    for engine in http_engines:
        assert engine.is_healthy()
        pids = engine.processes()
        assert engine.pid in pids and os.getpgid(engine.pid) == engine.pid
        assert len(pids) >= 3  # API server, EngineCore, Worker (and a resource tracker)
        names = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in pids}
        workers = [p for p, n in names.items() if "Worker" in n]
        assert workers, names
        cores.append({frozenset(os.sched_getaffinity(p)) for p in workers})
    assert cores == [{frozenset({0})}, {frozenset({1})}]  # VLLM_CPU_OMP_THREADS_BIND 0 / 1


def test_a_launch_that_times_out_leaves_no_process(
    make_cluster_config: Any, tmp_path: Path
) -> None:
    port = 18990
    cfg = make_cluster_config(
        num_instances=1, base_port=port, health_timeout_s=3, log_dir=str(tmp_path)
    )
    with pytest.raises(TimeoutError, match="no /health 200"):
        launch(cfg)
    assert _with_port(port) == []


@pytest.mark.stops_engines
def test_stop_ends_every_process_of_every_group(http_engines: list[LaunchedEngine]) -> None:
    pids = {p for e in http_engines for p in group_pids(e.pid)}
    stop(http_engines)
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    assert all(group_pids(e.pid) == [] for e in http_engines)


def test_a_server_killed_alone_takes_its_engine_core_and_workers_with_it(
    make_cluster_config: Any, tmp_path: Path
) -> None:
    """The API server dies (SIGKILL to it alone, as the OOM killer would): its watcher ends
    the engine core and workers it had started, where they used to run on as orphans."""
    cfg = make_cluster_config(num_instances=1, base_port=18992, log_dir=str(tmp_path))
    (engine,) = plan(cfg)
    engine.start()
    pgid = engine.pid
    try:
        deadline = time.monotonic() + 120.0
        while len(group_pids(pgid)) < 3 and time.monotonic() < deadline:  # core and worker up
            time.sleep(0.2)
        assert len(group_pids(pgid)) >= 3, engine.log_tail()
        os.kill(pgid, signal.SIGKILL)
        deadline = time.monotonic() + engine.orphan_grace_s + 15.0
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group_pids(pgid) == []
    finally:
        engine.stop(grace_s=1.0)
