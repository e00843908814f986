"""Starts and stops vLLM OpenAI API servers from a cluster config (conf/cluster/vllm_*.yaml).

``launch(cfg)`` starts ``num_instances`` servers (``python -m vllm.entrypoints.openai.api_server``),
each in its own process session and group, logging to a file, waits until every ``/health``
answers 200 and returns them as ``LaunchedEngine`` (with the ``ExecutionInstance`` to
register). ``stop(engines)`` ends each whole process group (the server, its EngineCore and
Worker): SIGTERM, then SIGKILL after a grace period. ``with launched(cfg) as engines:`` stops
them however the block ends; a failed launch stops what it started before raising. A server
that dies on its own (killed, crashed, out of memory) takes its group with it: a watcher
thread per server ends whatever of the group outlives it, so no engine core or worker is
left holding memory and cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.vllm.engine_args import resolve_model_dir, server_cli_args
from backends.vllm.pd import example_connector_config
from cpsim.types import ExecutionInstance
from cpsim.validation import check_positive


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, read from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def end_group(pgid: int, grace_s: float) -> list[int]:
    """SIGTERM to process group ``pgid``, SIGKILL to what is left after ``grace_s``; returns
    what is still alive 5 s after that (empty when the group is gone)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while (alive := group_pids(pgid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive:
            return []
    return alive


def _end_group_after(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """Wait for the server to exit, however it does, then end the rest of its group."""
    process.wait()
    end_group(process.pid, grace_s)


@dataclass
class LaunchedEngine:
    """One server process group; ``pid`` is the API server's and the group's id.
    ``orphan_grace_s``: once the server has exited, how long the rest of its group gets
    after a SIGTERM before a SIGKILL."""

    instance: ExecutionInstance
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    orphan_grace_s: float = 5.0

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def health_url(self) -> str:
        return f"{self.instance.endpoint}/health"

    def start(self) -> None:
        """Start the server (again, on the same port, after a ``kill``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.instance.metadata["pid"] = self.process.pid
        threading.Thread(
            target=_end_group_after,
            args=(self.process, self.orphan_grace_s),
            name=f"reaper-{self.instance.instance_id}",
            daemon=True,
        ).start()

    def processes(self) -> list[int]:
        """The group's live processes (empty once stopped)."""
        if self.process is None:
            return []
        self.process.poll()  # reap the server if it exited
        return group_pids(self.pid)

    def is_healthy(self) -> bool:
        return _healthy(self.health_url)

    def exited(self) -> bool:
        """Whether the server was started and its process has exited since (a crash)."""
        return self.process is not None and self.process.poll() is not None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (SIGKILL: a crash)."""
        with contextlib.suppress(ProcessLookupError, AssertionError):
            os.killpg(self.pid, sig)

    def wait_gone(self, timeout_s: float) -> list[int]:
        """Wait up to ``timeout_s`` for the group to exit; return what is still alive.

        A signal is delivered at once but a process takes a while to exit: one that has
        mapped gigabytes of KV cache spends seconds unmapping it after a SIGKILL."""
        deadline = time.monotonic() + timeout_s
        while (alive := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left after ``grace_s``."""
        if self.process is None:
            return
        end_group(self.pid, grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1.0)

    def wait_healthy(self, timeout_s: float) -> None:
        """Block until /health answers 200; raise (with the log's tail) when the server
        exits or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not self.is_healthy():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.instance.instance_id} exited with {self.process.returncode} before "
                    f"/health answered; log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.instance.instance_id}: no /health 200 at {self.health_url} within "
                    f"{timeout_s} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"


def _section(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The launcher settings: ``cfg["vllm"]`` of a cluster config, or ``cfg`` itself."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except ImportError:
        pass
    return dict(cfg.get("vllm", cfg))


def _vocab_size(model_dir: str) -> int:
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError):
        return 32000


def plan(cluster_cfg: Mapping[str, Any], log_dir: str | Path | None = None) -> list[LaunchedEngine]:
    """The engines ``launch`` would start (commands, env, instances), not started."""
    c = _section(cluster_cfg)
    num = int(c.get("num_instances", 1))
    check_positive("num_instances", num, integer=True)
    model_dir = resolve_model_dir(c.get("model_dir", "tiny-llama"))
    tp = int(c.get("tensor_parallel_size", 1))
    host, base_port = str(c.get("host", "127.0.0.1")), int(c.get("base_port", 8100))
    types = list(c.get("instance_types") or ["general"])
    binds = list(c.get("cpu_binds") or [])
    logs = Path(log_dir or c.get("log_dir") or tempfile.mkdtemp(prefix="vllm-launch-"))
    served_name = Path(model_dir).name
    if c.get("made_up_tokenizer"):  # text and chat with dummy weights and no download
        from backends.vllm.tiny_tokenizer import write_tiny_model

        model_dir = str(write_tiny_model(logs / "model", Path(model_dir)))
    args: dict[str, Any] = {
        "model": model_dir,
        # the name clients and the gateway ask for: the instances' model_name
        "served_model_name": served_name,
        "load_format": c.get("load_format", "dummy"),
        "tensor_parallel_size": tp,
        **dict(c.get("engine_args") or {}),
    }
    if c.get("kv_shared_storage_path"):
        args["kv_transfer_config"] = example_connector_config(c["kv_shared_storage_path"])
    metadata: dict[str, Any] = {"vocab_size": _vocab_size(model_dir), "launched": True}
    if args.get("max_model_len") is not None:
        metadata["max_model_len"] = int(args["max_model_len"])  # the gateway checks it
    adapters, lora_args = _lora(c, Path(model_dir), logs)
    lora_engines = set(range(num) if c.get("lora_engines") is None else c["lora_engines"])
    engines = []
    for i in range(num):
        port = base_port + i
        env = {**os.environ, **{k: str(v) for k, v in dict(c.get("env") or {}).items()}}
        if binds:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(binds[i % len(binds)])
        command = [
            str(c.get("python") or sys.executable),
            "-m",
            "vllm.entrypoints.openai.api_server",
            *server_cli_args({**args, **lora_args} if i in lora_engines else args),
            "--host",
            host,
            "--port",
            str(port),
            *[str(a) for a in c.get("extra_args") or []],
        ]
        iid = f"{c.get('name_prefix', 'engine')}-{i}"
        instance = ExecutionInstance(
            iid,
            host=host,
            port=port,
            model_name=str(args["served_model_name"]),
            tensor_parallel_size=tp,
            gpu_type="cpu",
            cost_per_gpu_hour=0.0,
            max_concurrent_requests=int(c.get("max_concurrent_requests", 64)),
            instance_type=types[i % len(types)],
            metadata=dict(metadata) | (
                {"lora_adapters": sorted(adapters)} if adapters and i in lora_engines else {}
            ),
        )
        engines.append(LaunchedEngine(instance, command, env, logs / f"{iid}.log"))
    return engines


def _lora(
    c: Mapping[str, Any], model_dir: Path, logs: Path
) -> tuple[dict[str, str], dict[str, Any]]:
    """The LoRA adapters of the launcher settings (``lora_modules``: name -> folder;
    ``made_up_lora_adapters``: names of random adapters written for a dummy-weight model)
    and the server flags that serve them (none without adapters)."""
    adapters = {str(k): str(v) for k, v in dict(c.get("lora_modules") or {}).items()}
    made_up = list(c.get("made_up_lora_adapters") or [])
    rank = int(c.get("max_lora_rank", 8))
    if made_up:
        from backends.vllm.tiny_lora import write_tiny_adapter

        for seed, name in enumerate(made_up):
            adapters[str(name)] = str(write_tiny_adapter(logs / "lora" / str(name), model_dir,
                                                         rank=rank, seed=seed))  # fmt: skip
    if not adapters:
        return {}, {}
    flags = {
        "enable_lora": True,
        "max_loras": int(c.get("max_loras", 1)),
        "max_lora_rank": rank,
        "lora_modules": [f"{name}={path}" for name, path in adapters.items()],
    }
    return adapters, flags


def launch(
    cluster_cfg: Mapping[str, Any], log_dir: str | Path | None = None
) -> list[LaunchedEngine]:
    """Start the servers of ``cluster_cfg`` (see conf/cluster/vllm_cpu_tiny.yaml) and return
    them once all answer /health. On any failure, stops all of them and raises."""
    engines = plan(cluster_cfg, log_dir)
    timeout_s = float(_section(cluster_cfg).get("health_timeout_s", 240.0))
    try:
        for engine in engines:
            engine.start()
        deadline = time.monotonic() + timeout_s
        for engine in engines:
            engine.wait_healthy(max(1.0, deadline - time.monotonic()))
    except BaseException:
        stop(engines)
        raise
    return engines


def stop(engines: list[LaunchedEngine], grace_s: float = 15.0) -> None:
    """Stop every engine's process group (SIGTERM all, then SIGKILL what is left)."""
    for engine in engines:
        engine.kill(signal.SIGTERM)
    for engine in engines:
        engine.stop(grace_s)


@contextlib.contextmanager
def launched(
    cluster_cfg: Mapping[str, Any], log_dir: str | Path | None = None
) -> Iterator[list[LaunchedEngine]]:
    """``with launched(cfg) as engines:`` the servers run inside the block only."""
    engines = launch(cluster_cfg, log_dir)
    try:
        yield engines
    finally:
        stop(engines)
