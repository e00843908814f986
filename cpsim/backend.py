"""How execution layers talk to the control plane: engine events in, dispatches and aborts out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from cpsim.core import Abort, ControlPlane, Dispatch
from cpsim.types import ExecutionInstance
from cpsim.views import InstanceSnapshot

Clock = Callable[[], float]


@runtime_checkable
class EngineEvents(Protocol):
    """What an engine reports. ``now`` is the driver's clock in seconds. Each event names
    the instance it happened on, so a late event from an instance the request has left is
    recognised and ignored."""

    def on_first_token(self, request_id: str, instance_id: str, now: float) -> None: ...

    def on_tokens(self, request_id: str, instance_id: str, num_tokens: int, now: float) -> None:
        """``num_tokens`` more output tokens, the first one included."""

    def on_prefill_done(self, request_id: str, instance_id: str, now: float) -> None:
        """A PREFILL dispatch computed the prompt; its KV cache waits for hand-off."""

    def on_finish(
        self,
        request_id: str,
        instance_id: str,
        num_output_tokens: int,
        now: float,
        extras: Mapping[str, float] | None = None,
    ) -> None: ...

    def on_failure(
        self, request_id: str, instance_id: str, reason: str, now: float, retryable: bool = True
    ) -> None: ...

    def on_instance_failure(self, instance_id: str, reason: str, now: float) -> None:
        """The instance went down; requests on it are lost to it."""

    def on_instance_recovered(self, instance_id: str, now: float) -> None: ...

    def on_snapshot(self, snapshot: InstanceSnapshot, now: float) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """An execution layer the asyncio manager drives: simulated replicas in wall time,
    in-process vLLM engines, or vLLM servers over HTTP.

    ``start`` receives the event sink and the clock to stamp events with. ``dispatch`` and
    ``abort`` must not block: they start work and return. Instances are added before
    requests are dispatched to them."""

    name: str

    async def start(self, events: EngineEvents, clock: Clock) -> None: ...

    async def stop(self) -> None: ...

    async def add_instance(self, instance: ExecutionInstance) -> None: ...

    async def remove_instance(self, instance_id: str) -> None: ...

    def dispatch(self, dispatch: Dispatch) -> None: ...

    def abort(self, abort: Abort) -> None: ...


class ControlPlaneEvents:
    """EngineEvents applied to a ControlPlane. ``on_change(now)`` runs after each event that
    may free capacity or add work (a driver's dispatch pass); token events do not trigger it.
    Events about an instance the control plane no longer knows are ignored."""

    def __init__(self, core: ControlPlane, on_change: Callable[[float], None]) -> None:
        self.core = core
        self.on_change = on_change

    def on_first_token(self, request_id: str, instance_id: str, now: float) -> None:
        self.core.on_first_token(request_id, now, instance_id)

    def on_tokens(self, request_id: str, instance_id: str, num_tokens: int, now: float) -> None:
        self.core.on_tokens(request_id, num_tokens, now, instance_id)

    def on_prefill_done(self, request_id: str, instance_id: str, now: float) -> None:
        self.core.on_prefill_done(request_id, now, instance_id)
        self.on_change(now)

    def on_finish(
        self,
        request_id: str,
        instance_id: str,
        num_output_tokens: int,
        now: float,
        extras: Mapping[str, float] | None = None,
    ) -> None:
        self.core.on_finish(request_id, now, num_output_tokens, instance_id, extras)
        self.on_change(now)

    def on_failure(
        self, request_id: str, instance_id: str, reason: str, now: float, retryable: bool = True
    ) -> None:
        self.core.on_failure(request_id, now, reason, retryable, instance_id)
        self.on_change(now)

    def on_instance_failure(self, instance_id: str, reason: str, now: float) -> None:
        with contextlib.suppress(ValueError):
            self.core.on_instance_failure(instance_id, now, reason)
        self.on_change(now)

    def on_instance_recovered(self, instance_id: str, now: float) -> None:
        with contextlib.suppress(ValueError):
            self.core.set_instance_health(instance_id, True)
        self.on_change(now)

    def on_snapshot(self, snapshot: InstanceSnapshot, now: float) -> None:
        self.core.on_instance_update(snapshot, now)
