"""A backend that plays each dispatch out on a fixed timetable, to test drivers sans engines."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from cpsim.backend import Clock, EngineEvents
from cpsim.core import Abort, Dispatch
from cpsim.types import ExecutionInstance
from cpsim.validation import check_non_negative, check_positive
from cpsim.views import InstanceSnapshot, Phase


@dataclass(frozen=True, slots=True)
class Timetable:
    """Seconds a request takes: TTFT = ``ttft_s`` + ``prefill_s_per_token`` x prompt
    tokens, then ``tpot_s`` per further token; a PD hand-off adds ``handoff_s``."""

    ttft_s: float = 0.01
    tpot_s: float = 0.002
    prefill_s_per_token: float = 0.0
    handoff_s: float = 0.005

    def __post_init__(self) -> None:
        check_non_negative("ttft_s", self.ttft_s)
        check_non_negative("tpot_s", self.tpot_s)
        check_non_negative("prefill_s_per_token", self.prefill_s_per_token)
        check_non_negative("handoff_s", self.handoff_s)


class ScriptedBackend:
    """Serves each dispatch as an asyncio task on a Timetable, scaled per instance by
    ``slowdown`` (``set_slowdown``). Tests can fail instances (``fail_instance``) and read
    which requests were aborted (``aborted``)."""

    name = "scripted"

    def __init__(
        self, timetable: Timetable | None = None, snapshot_interval_s: float = 0.05
    ) -> None:
        check_positive("snapshot_interval_s", snapshot_interval_s)
        self.timetable = timetable or Timetable()
        self.snapshot_interval_s = snapshot_interval_s
        self.aborted: list[Abort] = []
        self.dispatched: list[Dispatch] = []
        self._events: EngineEvents | None = None
        self._clock: Clock = lambda: 0.0
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._instances: dict[str, float] = {}  # id -> slowdown factor
        self._snapshotter: asyncio.Task[None] | None = None

    async def start(self, events: EngineEvents, clock: Clock) -> None:
        self._events, self._clock = events, clock
        self._snapshotter = asyncio.create_task(self._snapshot_loop())

    async def stop(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        if self._snapshotter is not None:
            tasks.append(self._snapshotter)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def add_instance(self, instance: ExecutionInstance) -> bool:
        self._instances[instance.instance_id] = 1.0
        return True

    async def remove_instance(self, instance_id: str) -> None:
        self._cancel_on(instance_id)
        self._instances.pop(instance_id, None)

    def set_slowdown(self, instance_id: str, factor: float) -> None:
        check_positive("factor", factor)
        self._instances[instance_id] = factor

    def fail_instance(self, instance_id: str, reason: str = "crashed") -> None:
        self._cancel_on(instance_id)
        assert self._events is not None
        self._events.on_instance_failure(instance_id, reason, self._clock())

    def dispatch(self, dispatch: Dispatch) -> None:
        self.dispatched.append(dispatch)
        task = asyncio.create_task(self._serve(dispatch))
        self._tasks[dispatch.request_id] = (dispatch.instance_id, task)

    def abort(self, abort: Abort) -> None:
        self.aborted.append(abort)
        entry = self._tasks.pop(abort.request_id, None)
        if entry is not None:
            entry[1].cancel()

    def in_flight(self, instance_id: str) -> int:
        return sum(1 for iid, _ in self._tasks.values() if iid == instance_id)

    def _cancel_on(self, instance_id: str) -> None:
        for rid, (iid, task) in list(self._tasks.items()):
            if iid == instance_id:
                task.cancel()
                del self._tasks[rid]

    async def _serve(self, d: Dispatch) -> None:
        events, tt, iid, rid = self._events, self.timetable, d.instance_id, d.request_id
        assert events is not None
        slow = self._instances.get(iid, 1.0)
        if d.phase is Phase.DECODE:
            await asyncio.sleep(tt.handoff_s * slow)
        prefill_s = tt.ttft_s + tt.prefill_s_per_token * d.request.prompt_tokens
        await asyncio.sleep(prefill_s * slow)
        if d.phase is Phase.PREFILL:
            self._tasks.pop(rid, None)
            events.on_prefill_done(rid, iid, self._clock())
            return
        events.on_first_token(rid, iid, self._clock())
        n = d.request.max_tokens
        if n > 1:
            await asyncio.sleep(tt.tpot_s * (n - 1) * slow)
            events.on_tokens(rid, iid, n - 1, self._clock())
        self._tasks.pop(rid, None)
        events.on_finish(rid, iid, n, self._clock())

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval_s)
            assert self._events is not None
            now = self._clock()
            for iid in list(self._instances):
                running = self.in_flight(iid)
                snap = InstanceSnapshot(
                    iid,
                    now,
                    num_running=running,
                    num_waiting=0,
                    kv_cache_usage_frac=min(1.0, running / 64),
                )
                self._events.on_snapshot(snap, now)
