"""Starts and stops vLLM OpenAI servers one at a time, for an autoscaled pool
(backends/live_autoscale.py): instance k is the k-th engine ``launcher.plan`` makes of the
cluster config (its port ``base_port + k``), started when asked for and served once its
health check answers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from backends.vllm.launcher import LaunchedEngine, plan
from cpsim.types import ExecutionInstance
from cpsim.validation import check_positive


class VLLMInstanceLauncher:
    """At most ``max_instances`` engines of ``cluster_cfg`` (conf/cluster/vllm_cpu_tiny.yaml's
    shape); ``health_timeout_s`` for each to come up. ``close`` stops what is still running."""

    def __init__(
        self,
        cluster_cfg: Mapping[str, Any],
        max_instances: int,
        health_timeout_s: float = 240.0,
        log_dir: str | None = None,
    ) -> None:
        check_positive("max_instances", max_instances, integer=True)
        cfg = dict(cluster_cfg)
        section = dict(cfg.get("vllm", cfg))
        section["num_instances"] = max_instances
        self.engines: list[LaunchedEngine] = plan({"vllm": section}, log_dir)
        self.health_timeout_s = health_timeout_s
        self._running: dict[str, LaunchedEngine] = {}

    @property
    def template(self) -> ExecutionInstance:
        return self.engines[0].instance

    async def start(self, index: int) -> ExecutionInstance:
        if not 0 <= index < len(self.engines):
            raise ValueError(
                f"engine index {index} is outside the {len(self.engines)} this launcher plans"
            )
        engine = self.engines[index]
        await asyncio.to_thread(engine.start)
        self._running[engine.instance.instance_id] = engine
        try:
            await asyncio.to_thread(engine.wait_healthy, self.health_timeout_s)
        except BaseException:  # it did not come up (or the start was called off): end it
            await self.stop(engine.instance.instance_id)
            raise
        return engine.instance

    def start_first(self, count: int) -> list[ExecutionInstance]:
        """Start engines 0..count-1 together and return their instances once all answer
        their health check (at start-up, before an event loop runs). On a failure, stops
        them and raises."""
        if not 0 <= count <= len(self.engines):
            raise ValueError(
                f"count={count} is outside the 0..{len(self.engines)} engines this launcher plans"
            )
        first = self.engines[:count]
        for engine in first:
            engine.start()
            self._running[engine.instance.instance_id] = engine
        try:
            for engine in first:
                engine.wait_healthy(self.health_timeout_s)
        except BaseException:
            self.close()
            raise
        return [engine.instance for engine in first]

    async def stop(self, instance_id: str) -> None:
        engine = self._running.pop(instance_id, None)
        if engine is not None:
            await asyncio.to_thread(engine.stop)

    def running(self) -> list[str]:
        return list(self._running)

    def close(self) -> None:
        for engine in list(self._running.values()):
            engine.stop()
        self._running.clear()
