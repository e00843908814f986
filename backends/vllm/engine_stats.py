"""What an in-process vLLM engine's scheduler reports each step, kept for snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cpsim.views import InstanceSnapshot


@dataclass
class EngineStats:
    """Latest scheduler state of one engine and running totals, updated once per engine step
    by the stat logger of ``stat_logger_class`` (vLLM calls it in the frontend event loop;
    it is not called while the engine idles, so the last state stays)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage_frac: float = 0.0
    num_steps: int = 0
    num_preemptions: int = 0
    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0
    #: (num_prefill_reqs, num_prefill_tokens, num_decode_reqs, num_decode_tokens, elapsed_ms)
    #: of the last step, with ``enable_logging_iteration_details`` on; else None.
    last_step: tuple[int, int, int, int, float] | None = None
    _window_queries: int = field(default=0, repr=False)
    _window_hits: int = field(default=0, repr=False)
    _hit_rate: float | None = field(default=None, repr=False)

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if iteration_stats is not None:
            self.num_preemptions += int(getattr(iteration_stats, "num_preempted_reqs", 0))
        if scheduler_stats is None:
            return
        self.num_steps += 1
        self.num_running = int(scheduler_stats.num_running_reqs)
        self.num_waiting = int(scheduler_stats.num_waiting_reqs) + int(
            getattr(scheduler_stats, "num_skipped_waiting_reqs", 0) or 0
        )
        self.kv_cache_usage_frac = float(scheduler_stats.kv_cache_usage)
        pc = getattr(scheduler_stats, "prefix_cache_stats", None)
        if pc is not None:
            self.prefix_queries_tokens += int(pc.queries)
            self.prefix_hits_tokens += int(pc.hits)
            self._window_queries += int(pc.queries)
            self._window_hits += int(pc.hits)
        d = getattr(scheduler_stats, "iteration_details", None)
        if d is not None:
            self.last_step = (
                int(d.num_ctx_requests),
                int(d.num_ctx_tokens),
                int(d.num_generation_requests),
                int(d.num_generation_tokens),
                float(d.elapsed_ms),
            )

    def prefix_cache_hit_rate(self) -> float | None:
        """Hit tokens over looked-up tokens since the last call (the last rate when nothing
        was looked up since; None before the first lookup)."""
        if self._window_queries > 0:
            self._hit_rate = self._window_hits / self._window_queries
            self._window_queries = self._window_hits = 0
        return self._hit_rate

    def snapshot(self, instance_id: str, now: float, healthy: bool) -> InstanceSnapshot:
        return InstanceSnapshot(
            instance_id,
            now,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage_frac=min(1.0, max(0.0, self.kv_cache_usage_frac)),
            prefix_cache_hit_rate=self.prefix_cache_hit_rate(),
            is_healthy=healthy,
        )


def stat_logger_class(stats: EngineStats) -> type:
    """A vLLM ``StatLoggerBase`` subclass (the factory ``AsyncLLM`` takes in ``stat_loggers``)
    whose instances write into ``stats``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotStatLogger(StatLoggerBase):  # type: ignore[misc,unused-ignore]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            stats.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotStatLogger
