"""Starting and stopping one in-process vLLM v1 AsyncLLM engine (EngineCore: a child process)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.vllm.engine_args import DEFAULT_ENV, engine_args_for
from backends.vllm.engine_stats import EngineStats, stat_logger_class

#: Engines are built one at a time: the environment (read by the EngineCore process when it
#: is spawned) is set for the build and restored after it.
_BUILD_LOCK = threading.Lock()


@dataclass
class LocalEngine:
    """A running AsyncLLM, the stats its stat logger keeps, and the arguments it was built
    with. ``owned``: a backend that adopted it (``engines=``) does not shut it down."""

    engine: Any
    stats: EngineStats
    engine_args: dict[str, Any]
    owned: bool = True
    vocab_size: int = 32000
    _stopped: bool = field(default=False, repr=False)

    @property
    def errored(self) -> bool:
        return bool(getattr(self.engine, "errored", False))

    async def shutdown(self) -> None:
        """Stop the engine and its processes (about 5 s); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.to_thread(self.engine.shutdown)


def _build(engine_args: dict[str, Any], env: Mapping[str, str], stats: EngineStats) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    with _BUILD_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            args = AsyncEngineArgs(**engine_args)
            return AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_class(stats)])
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


async def start_local_engine(
    engine_args: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> LocalEngine:
    """Build an AsyncLLM from ``engine_args`` (over the tiny-model defaults, see
    ``engine_args_for``) with ``env`` (over DEFAULT_ENV) in its processes. The build runs in
    a thread, so the event loop keeps serving; it returns when the engine is ready (about
    20-35 s on a CPU). ``disable_log_stats`` defaults to True: only our stat logger runs."""
    args = engine_args_for(overrides=engine_args)
    args.setdefault("disable_log_stats", True)
    full_env = {**DEFAULT_ENV, **(env or {})}
    stats = EngineStats()
    engine = await asyncio.to_thread(_build, args, full_env, stats)
    vocab = int(getattr(engine.vllm_config.model_config, "get_vocab_size", lambda: 32000)())
    return LocalEngine(engine, stats, args, vocab_size=vocab)
