"""A gateway over simulated replicas, served by uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn

from backends.sim.live import SimBackend
from cpsim.core import ControlPlaneConfig
from cpsim.manager import ControlPlaneManager
from cpsim.serve.app import Gateway, ServerSettings, create_app
from cpsim.types import ExecutionInstance
from experiments.fake_engine import FakeEngine

MODEL = "opt-13b"
FAKE_MODEL = "tiny-llama"  # what the stand-in engines serve


def sim_instances(n: int = 2, model: str = MODEL, **kwargs: Any) -> list[ExecutionInstance]:
    settings = {"gpu_type": "A100-80GB", "max_concurrent_requests": 16, **kwargs}
    return [ExecutionInstance(f"sim-{i}", model_name=model, **settings) for i in range(n)]


@contextlib.asynccontextmanager
async def running_gateway(
    instances: list[ExecutionInstance] | None = None,
    config: ControlPlaneConfig | None = None,
    routing_strategy: str = "load_balanced",
    backend: Any = None,
    quotas: Any = None,
    **settings: Any,
) -> AsyncIterator[tuple[Gateway, str]]:
    """The gateway and its base URL; stopped (manager and all) at the end."""
    backend = backend or SimBackend(token_reports="step")
    manager = ControlPlaneManager(
        backend=backend,
        config=config,
        routing_strategy=routing_strategy,
        enable_monitoring=False,
        quotas=quotas,
    )
    for instance in instances if instances is not None else sim_instances():
        manager.register_instance(instance)
    gateway = Gateway(manager, ServerSettings(**settings))
    server, task, port = await start_server(create_app(gateway))
    try:
        yield gateway, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def start_server(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """``app`` under uvicorn on a free loopback port, in this loop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Fake(NamedTuple):
    """A stand-in vLLM server (experiments/fake_engine) running in this event loop."""

    engine: FakeEngine
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int


@contextlib.asynccontextmanager
async def running_fakes(n: int, **kw: Any) -> AsyncIterator[list[Fake]]:
    """``n`` stand-in vLLM servers (``kw`` for FakeEngine), stopped when the block ends
    (one the test stopped itself is left as it is)."""
    fakes: list[Fake] = []
    try:
        for _ in range(n):
            engine = FakeEngine(FAKE_MODEL, **kw)
            server, task, port = await start_server(engine.app)
            fakes.append(Fake(engine, server, task, port))
        yield fakes
    finally:
        for fake in fakes:
            fake.server.should_exit = True
            await fake.task


def fake_instances(ports: list[int], max_model_len: int = 2048) -> list[ExecutionInstance]:
    """The stand-in servers on ``ports`` as instances ``engine-0``, ``engine-1``, ..."""
    return [
        ExecutionInstance(f"engine-{i}", host="127.0.0.1", port=port, model_name=FAKE_MODEL,
                          max_concurrent_requests=32, metadata={"max_model_len": max_model_len})
        for i, port in enumerate(ports)
    ]  # fmt: skip
