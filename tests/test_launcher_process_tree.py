"""A launched server that dies leaves no process behind: its watcher ends the rest of its
process group (in vLLM: the engine core and workers), however the server died. A stand-in
server that starts children is enough to show it, with no engine."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from backends.vllm.launcher import LaunchedEngine, group_pids
from cpsim.types import ExecutionInstance

#: Two children that sleep, one of which ignores SIGTERM (a stuck worker), then "ready".
SERVER = """
import subprocess, sys, time
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
stubborn = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"]
children = [subprocess.Popen(sleeper), subprocess.Popen(stubborn)]
print("ready", flush=True)
time.sleep(120)
"""


def _wait_for(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_killing_the_server_alone_leaves_no_child_of_it(tmp_path: Path) -> None:
    engine = LaunchedEngine(
        ExecutionInstance("fake"),
        [sys.executable, "-c", SERVER],
        dict(os.environ),
        tmp_path / "server.log",
        orphan_grace_s=0.5,
    )
    engine.start()
    pgid = engine.pid
    try:
        assert _wait_for(lambda: len(group_pids(pgid)) == 3, 20.0), group_pids(pgid)
        os.kill(pgid, signal.SIGKILL)  # the server only, as the OOM killer would
        assert _wait_for(lambda: not group_pids(pgid), 10.0), group_pids(pgid)
    finally:
        engine.stop(grace_s=0.5)
    assert group_pids(pgid) == []
