"""``cpsim serve`` as a process: it starts from conf/serve over simulated replicas, serves, and
on SIGTERM lets in-flight requests finish for the grace period, cancels the rest with an
answer to each client, refuses new ones, and exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
#: The console script the README uses, where the package is installed (else the module).
_SCRIPT = Path(sys.executable).with_name("cpsim")
CPSIM_SERVE = [str(_SCRIPT), "serve"] if _SCRIPT.exists() else [
    sys.executable, "-m", "experiments.serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def requests_held(url: str) -> float:
    """Requests the server has queued or running, read from its /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name in ("cpsim:num_requests_waiting", "cpsim:num_requests_running")
               for sample in family.samples)


def test_sigterm_finishes_short_requests_cancels_long_ones_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [*CPSIM_SERVE, f"server.port={port}",
         "server.shutdown_grace_s=1.5", "server.log_level=warning",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(url, process)
        models = httpx.get(f"{url}/v1/models").json()["data"]
        model = models[0]["id"]
        long_events: list[str] = []
        short: dict[str, Any] = {}

        def stream_long() -> None:
            body = {"model": model, "prompt": "a", "max_tokens": 4000, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        long_events.append(line[5:].strip())

        def ask_short() -> None:
            body = {"model": model, "prompt": "b", "max_tokens": 10}
            resp = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            short.update(status=resp.status_code, body=resp.json())

        threads = [threading.Thread(target=stream_long), threading.Thread(target=ask_short)]
        for thread in threads:
            thread.start()
        # SIGTERM only once the server holds both requests (or has answered the short one):
        # sent earlier, on a loaded machine, it can close the socket before the short one lands.
        deadline = time.monotonic() + 30
        while len(long_events) < 2 or not (short or requests_held(url) >= 2):
            assert time.monotonic() < deadline, (long_events, short)
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # a new request during the grace period is refused
            refused = httpx.post(f"{url}/v1/completions",
                                 json={"model": model, "prompt": "c"}, timeout=5).status_code
        except httpx.TransportError:
            refused = 0  # or the listening socket is already closed
        assert refused in (0, 503)
        for thread in threads:
            thread.join(30)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert short["status"] == 200 and short["body"]["usage"]["completion_tokens"] == 10
    assert long_events[-1] == "[DONE]"
    error = json.loads(long_events[-2])["error"]
    assert error["code"] == "shutdown"


def test_an_unknown_command_names_the_allowed_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import cli

    monkeypatch.setattr(sys, "argv", ["cpsim", "srve"])
    with pytest.raises(SystemExit, match=r"usage: cpsim \{serve\}.*got 'srve'"):
        cli.main()
