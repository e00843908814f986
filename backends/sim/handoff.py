"""PD hand-offs in flight: the KV cache travels before the decode replica gets the request."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import simpy

from backends.sim.process import ReplicaProcess
from backends.sim.request import SimRequest
from cpsim.views import Phase


class KVTransfers:
    """Delivers each hand-off after its transfer time unless it was cancelled meanwhile or
    its target crashed (even if it recovered since: the control plane has already requeued
    or failed that request). A request id may be handed off again after a retry; each
    transfer carries its own token so an old one never delivers the new one."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self._pending: dict[str, object] = {}

    def start(self, proc: ReplicaProcess, req: SimRequest, delay_s: float) -> None:
        token = object()
        self._pending[req.request_id] = token
        self.env.process(self._deliver(proc, req, delay_s, token, proc.num_crashes))

    def fail(self, request_id: str, delay_s: float, report: Callable[[], None]) -> None:
        """A transfer that breaks: ``report`` is called after ``delay_s`` unless the hand-off
        was cancelled meanwhile."""
        token = object()
        self._pending[request_id] = token
        self.env.process(self._break(request_id, delay_s, report, token))

    def _break(
        self, request_id: str, delay_s: float, report: Callable[[], None], token: object
    ) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(delay_s)
        if self._pending.get(request_id) is token:
            del self._pending[request_id]
            report()

    def cancel(self, request_id: str) -> bool:
        """Drop a transfer still in flight; False if there is none."""
        return self._pending.pop(request_id, None) is not None

    def _deliver(
        self, proc: ReplicaProcess, req: SimRequest, delay_s: float, token: object, crashes: int
    ) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(delay_s)
        if self._pending.get(req.request_id) is not token:
            return
        del self._pending[req.request_id]
        if proc.is_up and proc.num_crashes == crashes:
            req.kv_arrival_s = self.env.now
            proc.submit(req, Phase.DECODE)
