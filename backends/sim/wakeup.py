"""A bare SimPy wake-up: call a function after a delay, without a Timeout event's machinery.

SimPy's event loop needs two things of what it pops off its queue: ``callbacks`` (called with
the event, then set to None) and ``_ok`` (False would raise the event's failure). A
``WakeUp`` is exactly that, put on the queue with SimPy's public ``Environment.schedule``.
The simulator schedules 4-5 of them per request, where a ``Timeout`` would also build an
Event, check its delay and store a value it never reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import simpy

_NORMAL = 1  # simpy.events.NORMAL: the priority of a Timeout


class WakeUp:
    __slots__ = ("_ok", "callbacks")

    def __init__(self, callback: Callable[[Any], None]) -> None:
        self.callbacks: list[Callable[[Any], None]] | None = [callback]
        self._ok = True


def call_later(env: simpy.Environment, delay_s: float, callback: Callable[[Any], None]) -> WakeUp:
    """``callback(wakeup)`` at ``env.now + delay_s`` (after what is already due then, as a
    Timeout would be)."""
    if not delay_s >= 0.0:
        raise ValueError(f"delay_s={delay_s!r} is not allowed; a wake-up cannot be in the past")
    wake = WakeUp(callback)
    # SimPy types the argument as Event, but uses only the two attributes above.
    env.schedule(wake, _NORMAL, delay_s)  # type: ignore[arg-type]
    return wake
