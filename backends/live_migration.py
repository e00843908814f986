"""Migration live: a migration policy's moves carried out on a running ControlPlaneManager,
by recompute, as a control plane in front of unmodified vLLM engines can.

vLLM cannot hand a running request's KV to another engine (docs/migration.md), so a move
stops the request's stream on its source (vLLM aborts it) and continues it on the target as
a new completion whose prompt is the request's prompt and output so far; the target
computes that context again (from its prefix cache where it has the prompt), and the
client's stream goes on. This is the simulator's ``migration_mechanism=recompute``, and the
policy is the same object in both (``policies/migration/``).

Every ``policy.interval_s`` the policy sees the instances and the requests decoding on each
(the backend's ``decoding()``); each move the core accepts (``migration_problem``) and the
backend can carry out (its ``migration_problem``: the request's token ids are known and its
body can be continued) is handed over at once: there is no copy to wait for. The request's
record counts the move (``num_migrations``) and the pause its client saw, from the stop to
the target's first token (``migration_pause_s``).

    mover = LiveMigration(manager, KVBalancePolicy(interval_s=0.5))
    await mover.start()
    ...
    await mover.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cpsim.backend import MigratingBackend
from cpsim.manager import ControlPlaneManager
from cpsim.protocols import MigrationPolicy
from cpsim.validation import check_positive

log = logging.getLogger("cpsim.migration")


class LiveMigration:
    """Moves ``manager``'s decoding requests on ``policy``'s word (see the module)."""

    def __init__(self, manager: ControlPlaneManager, policy: MigrationPolicy) -> None:
        backend = manager.backend
        if not isinstance(backend, MigratingBackend):
            raise ValueError(
                f"backend {backend.name!r} cannot move running requests; live migration "
                "needs one that can stop a stream and continue it elsewhere (vllm_http)"
            )
        check_positive("interval_s", policy.interval_s)
        self.manager = manager
        self.policy = policy
        self.backend: MigratingBackend = backend
        self.num_moved = 0
        self.num_refused = 0  # moves the policy asked for that the core or backend refused
        self.last_refusal: str | None = None  # why the last one was refused
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            try:
                self.tick()
            except Exception:  # a bad tick must not end migration
                log.exception("migration tick failed")

    def tick(self) -> int:
        """Ask the policy and carry out its moves; returns how many were made."""
        core, now = self.manager.core, self.manager._now()
        moves = self.policy.plan(core.instance_views(), self.backend.decoding(), now)
        return sum(self.move(request_id, target) for request_id, target in moves)

    def move(self, request_id: str, target: str) -> bool:
        """Move one decoding request to ``target`` now; False (the reason counted in
        ``num_refused``, the reason in ``last_refusal``) when the core or the backend says
        it cannot."""
        core, now = self.manager.core, self.manager._now()
        problem = core.migration_problem(request_id, target)
        if problem is None:
            problem = self.backend.migration_problem(request_id)
        if problem is not None:
            log.debug("not moving %s to %s: %s", request_id, target, problem)
            self.num_refused += 1
            self.last_refusal = problem
            return False
        migration = core.start_migration(request_id, target, now)
        made = self.backend.stop_for_migration(request_id)
        handed_over = core.end_migration(request_id, made, now)
        assert handed_over, "nothing ran between the start and the end of the move"
        self.backend.continue_request(migration.request, target)
        self.num_moved += 1
        self.manager.events.on_change(now)  # the source's slot is free: dispatch
        return True
