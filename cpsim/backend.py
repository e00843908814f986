"""How execution layers talk to the control plane: engine events in, dispatches and aborts out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from cpsim.core import Abort, ControlPlaneEvents, Dispatch
from cpsim.types import ExecutionInstance, RequestMetadata
from cpsim.views import DecodeView, InstanceSnapshot

Clock = Callable[[], float]

__all__ = [
    "Backend",
    "Clock",
    "ControlPlaneEvents",
    "EngineEvents",
    "MigratingBackend",
    "check_started",
]


def check_started(backend: object, events: object, instance_id: str) -> None:
    """The clear error for a backend told of an instance before ``start`` (``events`` is
    what ``start`` sets, None before it)."""
    if events is None:
        name = type(backend).__name__
        raise RuntimeError(
            f"{name}.add_instance({instance_id!r}) was called before {name}.start(); "
            "register instances with ControlPlaneManager.register_instance (before or after "
            "cp.start(): the manager tells the backend once it has started) or start the "
            "backend first"
        )


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
        self,
        request_id: str,
        instance_id: str,
        reason: str,
        now: float,
        retryable: bool = True,
        instance_fault: bool = True,
    ) -> None:
        """The request failed on the instance; ``retryable``: another attempt may serve it
        (no token streamed, not the request's own fault); ``instance_fault``: the engine is
        to blame (an error, a timeout), which counts towards ejecting it, where a request
        the model cannot take is not."""

    def on_instance_failure(self, instance_id: str, reason: str, now: float) -> None:
        """The instance went down; requests on it are lost to it."""

    def on_instance_recovered(self, instance_id: str, now: float) -> None: ...

    def on_snapshot(self, snapshot: InstanceSnapshot, now: float) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """An execution layer the asyncio manager drives: simulated replicas in wall time,
    in-process vLLM engines, or vLLM servers over HTTP.

    ``start`` receives the event sink and the clock to stamp events with. ``dispatch`` and
    ``abort`` must not block: they start work and return. Instances are added after
    ``start`` and before requests are dispatched to them: ``add_instance`` returns True
    once the instance can take requests, or False when it cannot yet (a server not
    answering its first health check), in which case the backend reports
    ``on_instance_recovered`` when it can. The manager runs it in the background, so it
    may take long (an engine starting)."""

    name: str

    async def start(self, events: EngineEvents, clock: Clock) -> None: ...

    async def stop(self) -> None: ...

    async def add_instance(self, instance: ExecutionInstance) -> bool: ...

    async def remove_instance(self, instance_id: str) -> None: ...

    def dispatch(self, dispatch: Dispatch) -> None: ...

    def abort(self, abort: Abort) -> None: ...


@runtime_checkable
class MigratingBackend(Protocol):
    """A backend that can move a decoding request to another instance by recompute (what a
    control plane in front of unmodified vLLM engines can do: they cannot hand over a
    running request's KV). ``backends.live_migration`` drives it with a migration policy.

    ``decoding``: the requests decoding on each instance, as the policy sees them.
    ``migration_problem``: why a request cannot move now (None: it can).
    ``stop_for_migration``: stop it where it runs and return the output tokens it made in
    all; it reports nothing more until ``continue_request`` starts it on an instance, with
    its prompt and output so far as the prompt, its client's stream going on."""

    def decoding(self) -> dict[str, list[DecodeView]]: ...

    def migration_problem(self, request_id: str) -> str | None: ...

    def stop_for_migration(self, request_id: str) -> int: ...

    def continue_request(self, request: RequestMetadata, instance_id: str) -> None: ...
