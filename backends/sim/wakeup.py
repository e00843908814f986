"""Wake-ups: call a function after a delay of virtual time, more cheaply than a SimPy Timeout.

The simulator schedules 4-5 wake-ups per request (step and run ends, pokes, arrivals). A
``Scheduler`` keeps them in one of two places:

- **SimPy's own queue** (the default), with SimPy's public ``Environment.schedule``. SimPy's
  loop needs two things of what it pops: ``callbacks`` (called with the event, then set to
  None) and ``_ok`` (False would raise the event's failure); a ``WakeUp`` has both. Whoever
  owns the environment may run it as usual (``env.run``), in real time too.
- **A heap of its own beside SimPy's** (``merged=True``), for a driver that runs the
  environment only through ``Scheduler.run``. That loop is compiled and pops wake-ups without
  SimPy's interpreted ``step`` or a tuple per event, and is merged with SimPy's queue (the
  driver's processes, timeouts and events still run there) in SimPy's exact order: a
  wake-up takes its sequence number from the environment's own event counter and sorts as a
  Timeout of normal priority would. A merged run therefore gives the same results as the
  default, bit for bit (``tests/sim/test_wakeup.py``), with 11 % fewer instructions per
  simulated request (``benchmarks/sim_instructions.py``, 8 replicas, compiled build).

The merged heap reads three private attributes of ``simpy.Environment`` (``_now``,
``_queue``, ``_eid``; SimPy 4). Where they are missing, or the environment is a subclass
(a ``RealtimeEnvironment`` sleeps in its ``step``), ``merged=True`` falls back to SimPy's queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import simpy

_NORMAL = 1  # simpy.events.NORMAL: the priority of a Timeout


class WakeUp:
    """``callback(self)`` at ``time_s``; ``eid`` orders wake-ups due at the same time."""

    __slots__ = ("_ok", "callback", "callbacks", "eid", "time_s")

    def __init__(self, callback: Callable[[Any], None], time_s: float, eid: int) -> None:
        self.callback = callback
        self.time_s = time_s
        self.eid = eid
        self._ok = True
        # what SimPy's loop calls when the wake-up is on its queue
        self.callbacks: list[Callable[[Any], None]] | None = None


def _before(a: WakeUp, b: WakeUp) -> bool:
    return a.time_s < b.time_s or (a.time_s == b.time_s and a.eid < b.eid)


def _push(heap: list[WakeUp], wake: WakeUp) -> None:
    heap.append(wake)
    i = len(heap) - 1
    while i > 0:
        parent = (i - 1) >> 1
        above = heap[parent]
        if not _before(wake, above):
            break
        heap[i] = above
        i = parent
    heap[i] = wake


def _pop(heap: list[WakeUp]) -> WakeUp:
    top = heap[0]
    last = heap.pop()
    n = len(heap)
    if n:
        i = 0
        child = 1
        while child < n:
            right = child + 1
            if right < n and _before(heap[right], heap[child]):
                child = right
            below = heap[child]
            if not _before(below, last):
                break
            heap[i] = below
            i = child
            child = 2 * i + 1
        heap[i] = last
    return top


def _can_merge(env: simpy.Environment) -> bool:
    return (
        type(env) is simpy.Environment
        and isinstance(getattr(env, "_queue", None), list)
        and hasattr(env, "_eid")
        and hasattr(env, "_now")
    )


class Scheduler:
    """The clock and the wake-ups of one SimPy environment (see the module's docstring)."""

    def __init__(self, env: simpy.Environment, merged: bool = False) -> None:
        self.env = env
        self.merged = merged and _can_merge(env)
        self._heap: list[WakeUp] = []
        self._now = float(env.now)
        raw: Any = env  # the private fields below are SimPy's, typed loosely here
        self._queue: list[Any] = raw._queue if self.merged else []
        self._eid: Any = raw._eid if self.merged else None
        self._stopped = False

    def now(self) -> float:
        """The environment's time (``Environment.now`` is a Python property; this is not,
        when merged)."""
        return self._now if self.merged else float(self.env.now)

    def call_later(self, delay_s: float, callback: Callable[[Any], None]) -> WakeUp:
        """``callback(wakeup)`` at now + ``delay_s``, after what is already due then (as a
        Timeout would be)."""
        if not delay_s >= 0.0:
            raise ValueError(f"delay_s={delay_s!r} is not allowed; a wake-up cannot be in the past")
        if not self.merged:
            wake = WakeUp(callback, float(self.env.now) + delay_s, 0)
            wake.callbacks = [callback]
            # SimPy types the argument as Event, but uses only ``callbacks`` and ``_ok``.
            self.env.schedule(wake, _NORMAL, delay_s)  # type: ignore[arg-type]
            return wake
        wake = WakeUp(callback, self._now + delay_s, next(self._eid))
        _push(self._heap, wake)
        return wake

    def run(self, until: simpy.Event) -> None:
        """Run the environment until ``until`` has been processed (``env.run(until=until)``;
        merged, this loop also pops the wake-ups, in SimPy's order)."""
        env = self.env
        if not self.merged:
            env.run(until=until)
            return
        if float(env.now) != self._now:
            raise RuntimeError(
                f"the environment is at {env.now}, its scheduler at {self._now}: a merged "
                "Scheduler's environment must be run only through Scheduler.run"
            )
        if until.callbacks is None:  # processed already
            return
        self._stopped = False
        until.callbacks.append(self._stop)
        raw: Any = env
        heap, queue = self._heap, self._queue
        while not self._stopped:
            if heap:
                wake = heap[0]
                if queue:
                    head = queue[0]
                    at = float(head[0])
                    if at < wake.time_s or (
                        at == wake.time_s
                        and (head[1] < _NORMAL or (head[1] == _NORMAL and head[2] < wake.eid))
                    ):
                        self._now = at
                        env.step()
                        continue
                _pop(heap)
                self._now = wake.time_s
                raw._now = wake.time_s
                wake.callback(wake)
            elif queue:
                self._now = float(queue[0][0])
                env.step()
            else:
                raise RuntimeError(
                    f'No scheduled events left but "until" event was not triggered: {until}'
                )

    def _stop(self, _event: Any) -> None:
        self._stopped = True
