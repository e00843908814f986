"""Migration in the simulator: a migration policy's moves carried out on a ClusterSimulation,
as Llumnix migrates running requests between vLLM instances.

Every ``policy.interval_s`` the policy sees the instances and the requests decoding on each
(``DecodeView``: context, tokens to go, KV share) and returns moves. Each move the core
accepts (``ControlPlane.start_migration`` holds a slot on the target) is carried out in
stages over the cluster's KV link: the request's KV is copied while it keeps decoding on its
source; then the KV of the tokens it made meanwhile, again while it decodes, until that is
at most a block or ``max_stages`` copies were made; then the source stops it at the end of
its step in flight, the last tokens' KV is copied (the downtime, the only time the request
makes no progress), and the target takes it over with its whole context in place.

With ``mechanism="recompute"`` nothing is copied: the source stops the request at the end of
its step in flight and the target prefills its whole context again (no prefix cache hit: a
vLLM engine has no way to take in another engine's running request, so this is what a
control plane in front of vLLM can do: abort it, and send prompt and output so far as a new
prompt). The pause is then the target's prefill, seen in the request's TPOT.

A move is given up, the request staying where it runs, when the request finishes first,
either instance goes down, or the target has no room for the KV at the hand-over; a target
lost during the last copy leaves the request resumed on its source. A source lost at any
point loses the request as any crash does (it fails: its tokens were streamed).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import simpy

from backends.sim.request import SimRequest
from cpsim.core import Migration
from cpsim.protocols import MigrationPolicy
from cpsim.types import RequestStatus
from cpsim.validation import check_choice, check_positive
from cpsim.views import DecodeView, Phase

if TYPE_CHECKING:
    from backends.sim.cluster import ClusterSimulation
    from backends.sim.process import ReplicaProcess

MECHANISMS = ("kv_copy", "recompute")


class Migrations:
    """Carries out ``policy``'s moves on ``sim`` (see the module) and counts them."""

    def __init__(
        self,
        sim: ClusterSimulation,
        policy: MigrationPolicy,
        mechanism: str = "kv_copy",
        max_stages: int = 3,
    ) -> None:
        check_choice("migration_mechanism", mechanism, MECHANISMS)
        check_positive("max_stages", max_stages, integer=True)
        self.sim = sim
        self.policy = policy
        self.mechanism = mechanism
        self.max_stages = max_stages
        self.num_started = 0
        self.num_refused = 0  # moves the core refused (migration_problem)
        self.num_no_room = 0  # given up at the hand-over: no KV room on the target
        self.num_resumed = 0  # target lost during the last copy: resumed on the source
        self.bytes_copied = 0.0
        self.downtimes_s: list[float] = []

    def loop(self) -> Generator[simpy.Event, Any, None]:
        env = self.sim.env
        while not self.sim.done:
            yield env.timeout(self.policy.interval_s)
            self.tick(env.now)

    def tick(self, now: float) -> None:
        cp = self.sim.cp
        for request_id, target in self.policy.plan(cp.instance_views(), self.decoding(), now):
            if cp.migration_problem(request_id, target) is not None:
                self.num_refused += 1
                continue
            self.num_started += 1
            self.sim.env.process(self._migrate(cp.start_migration(request_id, target, now)))

    def decoding(self) -> dict[str, list[DecodeView]]:
        """The requests decoding on each replica that is up (not migrating already)."""
        cp = self.sim.cp
        out: dict[str, list[DecodeView]] = {}
        for iid, proc in self.sim.procs.items():
            if not proc.is_up:
                continue
            rep = proc.replica
            ahead = proc.steps_ended_in_run()  # tokens made in a run, not yet applied
            views = out[iid] = []
            for rid in rep.running_ids():
                state = cp.request_state(rid)
                req = rep.get(rid)
                if state is None or req is None or state.instance_id != iid:
                    continue
                if state.first_token_s is None or state.phase is Phase.PREFILL:
                    continue
                if cp.migration_target(rid) is not None:
                    continue
                here = min(req.num_output_tokens + ahead, req.max_tokens)
                context = req.num_prompt_tokens + here
                views.append(
                    DecodeView(
                        rid,
                        iid,
                        context,
                        state.view.meta.max_tokens - state.token_offset - here,
                        -(-context // rep.block_size) / rep.pool.num_blocks,
                    )
                )
        return out

    def _migrate(self, m: Migration) -> Generator[simpy.Event, Any, None]:
        sim, cp, env = self.sim, self.sim.cp, self.sim.env
        rid, source, target = m.request_id, m.source_instance_id, m.instance_id
        src, dst = sim.procs[source], sim.procs[target]
        kv_bytes = sim.specs[source].model.kv_bytes_per_token()
        block_size = src.replica.block_size
        copied = 0
        stages = self.max_stages if self.mechanism == "kv_copy" else 0
        for _ in range(stages):  # copies while it decodes
            req = src.replica.get(rid)
            if req is None or not self._on(rid, target, src, dst):
                cp.cancel_migration(rid)
                return
            delta = req.num_tokens - copied
            if copied and delta <= block_size:
                break
            yield env.timeout(sim.kv_link.transfer_s(delta * kv_bytes))
            self.bytes_copied += delta * kv_bytes
            copied += delta
        req = src.replica.get(rid)
        if req is None or not self._on(rid, target, src, dst):
            cp.cancel_migration(rid)
            return
        if dst.replica.num_free_blocks < -(-req.num_tokens // dst.replica.block_size):
            self.num_no_room += 1
            cp.cancel_migration(rid)
            return
        stopped = env.event()

        def off(stopped_req: SimRequest, _now: float) -> None:
            stopped.succeed(stopped_req)

        if not src.detach(rid, off):
            cp.cancel_migration(rid)
            return
        req = yield stopped
        downtime_s = 0.0
        if self.mechanism == "kv_copy":
            delta = req.num_tokens - copied
            downtime_s = sim.kv_link.transfer_s(delta * kv_bytes)
            yield env.timeout(downtime_s)  # the last copy, the request stopped
            self.bytes_copied += delta * kv_bytes
        self._hand_over(m, req, downtime_s, src, dst)

    def _hand_over(
        self,
        m: Migration,
        req: SimRequest,
        downtime_s: float,
        src: ReplicaProcess,
        dst: ReplicaProcess,
    ) -> None:
        cp, now = self.sim.cp, self.sim.env.now
        rid = m.request_id
        state = cp.request_state(rid)
        if state is None:  # it ended meanwhile (its source crashed, it was cancelled)
            return
        made = state.token_offset + req.num_output_tokens
        remaining = m.request.max_tokens - made
        if remaining <= 0:  # its last token came in the step it was stopped after
            cp.cancel_migration(rid)
            cp.on_finish(rid, now, req.num_output_tokens, m.source_instance_id)
            return
        if cp.end_migration(rid, made, now, downtime_s):
            self.downtimes_s.append(downtime_s)
            where = dst
        elif state.status is RequestStatus.RUNNING and state.instance_id == m.source_instance_id:
            cp.resume(rid, made)  # the target went during the last copy
            self.num_resumed += 1
            where = src
        else:
            return
        if self.mechanism == "kv_copy" or where is src:
            where.submit(_continuation(req, remaining, now, True), Phase.DECODE)
        else:  # the target computes the whole context again
            where.submit(_continuation(req, remaining, now, False), Phase.FULL)

    def _on(self, rid: str, target: str, src: ReplicaProcess, dst: ReplicaProcess) -> bool:
        """The move is still on: the core has not given it up, and both replicas are up."""
        return self.sim.cp.migration_target(rid) == target and src.is_up and dst.is_up

    def summary(self) -> dict[str, float]:
        cp = self.sim.cp
        downtimes = self.downtimes_s
        return {
            "started": self.num_started,
            "handed_over": cp.num_migrations,
            "given_up": cp.num_migrations_cancelled,
            "refused": self.num_refused,
            "no_room": self.num_no_room,
            "resumed_on_source": self.num_resumed,
            "gb_copied": self.bytes_copied / 1e9,
            "mean_downtime_ms": 1000.0 * sum(downtimes) / len(downtimes) if downtimes else 0.0,
        }


def _continuation(req: SimRequest, remaining: int, now: float, kv_in_place: bool) -> SimRequest:
    """The request as the target (or its source, resuming) takes it: its whole context as
    its prompt (its KV in place, as a PD hand-off's, or to be computed again), ``remaining``
    tokens to make; what the replica recorded of it so far carried over."""
    cont = SimRequest(
        req.request_id, req.num_tokens, remaining, (), kv_in_place, now, validate=False
    )
    cont.num_preemptions = req.num_preemptions
    cont.num_prefix_hit_tokens = req.num_prefix_hit_tokens
    cont.scheduled_before = True  # its prefix was looked up where it started
    cont.kv_arrival_s = req.kv_arrival_s
    cont.first_token_time_s = req.first_token_time_s
    return cont

