"""The SimPy process of one simulated replica: steps in virtual time, events, faults."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any, Literal

import numpy as np
import simpy

from backends.sim.decode_set import linear_run_end_s, linear_run_steps_done
from backends.sim.faults import Fault
from backends.sim.replica import SimReplica
from backends.sim.request import SimRequest
from backends.sim.step import StepOutcome, StepPlan
from backends.sim.wakeup import Scheduler, WakeUp
from cpsim.backend import EngineEvents
from cpsim.latency import frontend_costs_s, request_path_s
from cpsim.validation import check_choice
from cpsim.views import InstanceSnapshot, Phase, new_namedtuple

TokenReports = Literal["finish", "step"]
_INF = math.inf
# driver states: no work (or down); stalled; one step or the end of a run in flight; a decode
# run in flight (a wake-up cuts it short)
_IDLE, _STALLED, _BUSY, _RUN = "idle", "stalled", "busy", "run"


class ReplicaProcess:
    """Drives a SimReplica in a SimPy environment (seconds) and reports to ``events``.

    Idle, it waits for a wake-up (submit, abort, fault). With work, it runs either one step
    (schedule, wait the priced step time, apply) or, when the next steps are a pure decode run,
    the whole run in one wait that a wake-up cuts short: the step in progress then finishes
    (a real engine finishes its step before admitting) and the run stops there.

    It is a state machine of event callbacks, not a generator process: each step, run or stall
    is one wake-up (``wakeup.Scheduler.call_later``) whose callback applies it and starts what
    comes next (about 10 % faster than resuming a process per event, with the same results).

    ``token_reports="finish"`` reports the first token at its exact time and then only
    ``on_finish``, which carries the output token count (cheap: no per-step calls);
    ``"step"`` also reports ``on_tokens`` after every step or run. ``use_decode_runs=False``
    runs every step on its own (slower; the same results, for tests). ``clock``: the
    environment's ``Scheduler`` (default: one on SimPy's own queue, so the environment may be
    run as usual); a driver that runs it through a merged Scheduler passes that.

    The latency model's serving path (``cpsim.latency.request_path_s``) delays a submitted
    request's admission by ``ingress_s`` and every report to ``events`` by ``egress_s``, as
    a real engine core takes requests in and sends outputs out through its frontend; with
    both 0 (engine-only profiles) nothing is delayed and no event is added. A model with
    frontend costs (``cpsim.latency.frontend_costs_s``) adds the frontend's two queues: each
    request waits its turn to be taken in, each step's outputs theirs to be handed on."""

    def __init__(
        self,
        env: simpy.Environment,
        replica: SimReplica,
        events: EngineEvents,
        token_reports: TokenReports = "finish",
        use_decode_runs: bool = True,
        clock: Scheduler | None = None,
    ) -> None:
        check_choice("token_reports", token_reports, ("finish", "step"))
        if clock is not None and clock.env is not env:
            raise ValueError("clock is the Scheduler of another environment; it must be env's")
        self.env = env
        self.clock = clock if clock is not None else Scheduler(env)
        self.replica = replica
        self.events = events
        self.instance_id = replica.instance_id
        self.token_reports = token_reports
        self.use_decode_runs = use_decode_runs
        self.is_up = True
        self.num_crashes = 0
        self._phases: dict[str, Phase] = {}
        self._state = _IDLE
        self._wake_due = False
        self._start_s = float(env.now)
        self._busy_s = 0.0
        self._step_start_s: float | None = None
        self._slowdown = 1.0
        self._stalled_until_s = -_INF
        self._stall_debt_s = 0.0
        self._pending: WakeUp | None = None  # ends the work in flight
        self._then: Callable[[float], None] | None = None  # what follows it (given now)
        self._plan: StepPlan | None = None
        self._run_horizon = 0
        self._run_done = 0
        self._run_linear = (0.0, 0.0)
        self._run_times: np.ndarray | None = None
        self._run_start_s = 0.0
        self._in_run = False
        self._deferred_aborts: list[str] = []
        self._ingress_s, self._egress_s = request_path_s(replica.latency)
        # the frontend's two queues (cpsim.latency.frontend_costs_s): when each is next free
        self._request_cost_s, self._stream_cost_s = frontend_costs_s(replica.latency)
        self._inputs_free_s = -_INF
        self._outputs_free_s = -_INF
        self._arriving: dict[str, SimRequest] = {}  # submitted, still on the ingress path
        # a "fail" fault (black hole): until when, how soon each request fails, and the
        # requests due to fail
        self._failing_until_s = -_INF
        self._fail_after_s = 0.0
        self._doomed: set[str] = set()
        # requests being taken off between steps (a migration's hand-over), and what to call
        # with each once it is off
        self._detaching: dict[str, tuple[SimRequest, Callable[[SimRequest, float], None]]] = {}
        # a "crashloop" fault: until when each start crashes again, and how soon after it
        self._crashloop_until_s = -_INF
        self._crash_after_s = 0.0
        # told of each crash (instance, now, whether a fault brings the replica back by
        # itself): the cluster's restart policy listens here
        self.on_crash: Callable[[str, float, bool], None] | None = None

    # ------------------------------------------------------------------ inputs
    def submit(self, req: SimRequest, phase: Phase) -> None:
        """Start ``phase`` of a request: FULL generates ``max_tokens``; PREFILL (max_tokens must
        be 1) computes the prompt and reports ``on_prefill_done``; DECODE (``prompt_cached``)
        continues from a handed-off KV cache and generates ``max_tokens``."""
        if phase is Phase.PREFILL and req.max_tokens != 1:
            raise ValueError(f"a PREFILL request needs max_tokens=1, got {req.max_tokens}")
        if phase is Phase.DECODE and not req.prompt_cached:
            raise ValueError("a DECODE request needs prompt_cached=True (its KV is handed off)")
        now = self.clock.now()
        reason = self._cannot_serve(req)
        if reason is not None:  # the request's fault while up, else the instance's
            down = not self.is_up
            self.events.on_failure(req.request_id, self.instance_id, reason, now, down, down)
            return
        if req.arrival_time_s == 0.0:
            req.arrival_time_s = float(now)
        self._phases[req.request_id] = phase
        if self._failing_until_s > now:
            self._fail_later(req.request_id)
            return
        delay_s = self._ingress_s
        if self._request_cost_s > 0.0:
            self._inputs_free_s = max(now, self._inputs_free_s) + self._request_cost_s
            delay_s += self._inputs_free_s - now
        if delay_s > 0.0:
            self._arriving[req.request_id] = req
            self.clock.call_later(delay_s, lambda _event: self._admit(req))
            return
        self.replica.add_request(req)
        self._poke()

    def _admit(self, req: SimRequest) -> None:
        """The end of the ingress path: the engine takes the request in, unless it was
        aborted or lost in a crash meanwhile."""
        if self._arriving.get(req.request_id) is not req:
            return
        del self._arriving[req.request_id]
        self.replica.add_request(req)
        self._poke()

    def _cannot_serve(self, req: SimRequest) -> str | None:
        rep = self.replica
        if not self.is_up:
            return f"instance {self.instance_id} is down"
        if rep.blocks_needed(req) > rep.pool.num_blocks:
            return (f"request needs {rep.blocks_needed(req)} KV blocks, instance "
                    f"{self.instance_id} has {rep.pool.num_blocks}")
        cfg = rep.config
        if not cfg.enable_chunked_prefill and (
            req.num_prompt_tokens + req.max_tokens > cfg.max_num_batched_tokens
        ):
            return (f"prompt + max_tokens = {req.num_prompt_tokens + req.max_tokens} exceeds "
                    f"max_num_batched_tokens={cfg.max_num_batched_tokens} without chunked prefill")
        return None

    def abort(self, request_id: str) -> bool:
        """Stop a request; nothing more is reported for it. False if the replica lacks it."""
        if self._phases.pop(request_id, None) is None:
            return False
        if self._arriving.pop(request_id, None) is not None:  # not in the engine yet
            return True
        if request_id in self._doomed:
            self._doomed.discard(request_id)
            return True
        if self._in_run:  # a decode run in flight: the abort applies when it stops
            self._deferred_aborts.append(request_id)
        else:
            self.replica.abort_request(request_id)
        self._poke()
        return True

    def detach(self, request_id: str, then: Callable[[SimRequest, float], None]) -> bool:
        """Take a running request off the replica at the end of the step in flight (an
        engine stops a request between steps) and call ``then(request, now)`` with its
        progress at that moment; nothing more is reported for it. False if the replica does
        not hold it. A crash before the step ends loses it: ``then`` is not called."""
        req = self.replica.get(request_id)
        if req is None or not self.abort(request_id):
            return False
        if req.is_finished:
            then(req, self.clock.now())
        else:
            self._detaching[request_id] = (req, then)
        return True

    def _detached(self, now: float) -> None:
        for rid, (req, then) in list(self._detaching.items()):
            if req.is_finished:
                del self._detaching[rid]
                then(req, now)

    def add_fault(self, fault: Fault) -> None:
        """Schedule a fault on this replica (at ``fault.at_s``)."""
        self.env.process(self._fault(fault))

    def snapshot(self, now: float | None = None) -> InstanceSnapshot:
        """What a scrape of the engine's metrics would show now."""
        now = float(self.clock.now() if now is None else now)
        rep = self.replica
        busy = self._busy_s
        if self._step_start_s is not None:
            busy += now - self._step_start_s
        elapsed = now - self._start_s
        # a simulation takes a snapshot per replica per scrape
        return new_namedtuple(
            InstanceSnapshot,
            (
                self.instance_id,
                now,
                rep.num_running,
                rep.num_waiting,
                rep.kv_cache_usage_frac,
                rep.prefix_cache_hit_rate,
                min(1.0, busy / elapsed) if elapsed > 0 else 0.0,
                self.is_up,
            ),
        )

    @property
    def is_stalled(self) -> bool:
        return self.clock.now() < self._stalled_until_s

    @property
    def slowdown(self) -> float:
        return self._slowdown

    # ------------------------------------------------------------------ the driver
    def _poke(self) -> None:
        """Something changed (submit, abort, fault): look again once, at this instant, after
        the events already due now (so requests submitted together are scheduled together).
        A decode run whose step in flight ends later is cut at once instead (the same result
        without the extra event: nothing is decided before that step ends)."""
        if self._state is _RUN and self._cut_run(self.clock.now(), tail_only=True):
            return
        if not self._wake_due:
            self._wake_due = True
            self.clock.call_later(0.0, self._on_wake)

    def _on_wake(self, _event: WakeUp) -> None:
        self._wake_due = False
        state = self._state
        if state is _RUN:
            self._cut_run(self.clock.now())
        elif state is not _BUSY:  # idle or stalled: decide again
            self._next(self.clock.now())

    # The clock is read once per wake-up and handed down as ``now`` (it cannot move within
    # one): ``Environment.now`` is a Python property, and was read ~18 times per request.
    def _wait(self, delay_s: float, then: Callable[[float], None]) -> None:
        """Work in flight for ``delay_s``; then (after any stall that began meanwhile) ``then``."""
        self._pending = self.clock.call_later(delay_s, self._on_pending)
        self._then = then

    def _on_pending(self, event: WakeUp) -> None:
        if event is self._pending:  # else stale: cut short, or lost in a crash
            self._pending = None
            self._work_done(self.clock.now())

    def _work_done(self, now: float) -> None:
        debt = self._stall_debt_s
        if debt > 0:  # a stall that began during the work delays its end by the stall's length
            self._stall_debt_s = 0.0
            self._state = _BUSY
            if debt < _INF:
                self._pending = self.clock.call_later(debt, self._on_pending)
            return  # a stall for good: only a crash ends it
        start = self._step_start_s
        if start is not None:
            self._busy_s += now - start
            self._step_start_s = None
        then, self._then = self._then, None
        if then is not None:
            then(now)

    def _next(self, now: float) -> None:
        """Start what comes next: nothing, a stall, a decode run or one step."""
        rep = self.replica
        if not self.is_up or not rep.has_work:
            self._state = _IDLE
            return
        if now < self._stalled_until_s:
            self._state = _STALLED
            if self._stalled_until_s < _INF:
                self.clock.call_later(self._stalled_until_s - now, self._on_stall_end)
            return
        horizon = rep.decode_horizon() if self.use_decode_runs else 0
        if horizon >= 2:
            self._start_run(horizon, now)
        else:
            self._start_step(now)

    def _on_stall_end(self, _event: WakeUp) -> None:
        if self._state is _STALLED:
            self._next(self.clock.now())

    def _start_step(self, now: float) -> None:
        rep = self.replica
        plan = rep.schedule()
        if plan.is_empty:  # nothing admissible and nothing running: wait for a change
            rep.update_from_output(plan)
            self._state = _IDLE
            return
        self._plan = plan
        self._state = _BUSY
        self._step_start_s = now
        scale = self._slowdown * rep.step_factor()
        self._wait(rep.latency.step_time_s(plan.batch) * scale, self._end_step)

    def _end_step(self, now: float) -> None:
        plan, self._plan = self._plan, None
        assert plan is not None
        self._report(self.replica.update_from_output(plan), now)
        if self._detaching:
            self._detached(now)
        self._next(now)

    def _start_run(self, horizon: int, now: float) -> None:
        rep = self.replica
        scale = self._slowdown * rep.step_factor()
        linear = rep.decode_run_linear_s(horizon)
        if linear is not None:
            first, increment = self._run_linear = (linear[0] * scale, linear[1] * scale)
            self._run_times = None
            total = linear_run_end_s(first, increment, horizon)
        else:
            self._run_times = times = rep.decode_run_times_s(horizon) * scale
            total = float(times[-1])
        self._run_horizon = horizon
        self._run_start_s = now
        self._state = _RUN
        self._in_run = True
        self._step_start_s = now
        self._wait(total, self._end_run_whole)

    def steps_ended_in_run(self) -> int:
        """Steps of the decode run in flight that have ended by now, each a token for every
        request of the run, not yet applied to them (the run applies its steps when it
        ends); 0 when no run is in flight."""
        if self._state is not _RUN or self._step_start_s is None:
            return 0
        elapsed = self.clock.now() - self._step_start_s
        if self._run_times is None:
            first, increment = self._run_linear
            done = linear_run_steps_done(first, increment, elapsed)
        else:
            done = int(np.searchsorted(self._run_times, elapsed, side="right"))
        return min(done, self._run_horizon)

    def _cut_run(self, now: float, tail_only: bool = False) -> bool:
        """Woken during a run: the step in flight finishes, then the run stops. With
        ``tail_only``, only when a step is still in flight (else nothing; False)."""
        horizon, times = self._run_horizon, self._run_times
        assert self._step_start_s is not None
        elapsed = now - self._step_start_s
        if times is None:
            first, increment = self._run_linear
            num_steps = linear_run_steps_done(first, increment, elapsed)
            step_end = linear_run_end_s(first, increment, num_steps)
            in_flight = num_steps == 0 or step_end < elapsed
            next_end = linear_run_end_s(first, increment, num_steps + 1)
        else:
            num_steps = int(np.searchsorted(times, elapsed, side="right"))
            in_flight = num_steps == 0 or float(times[num_steps - 1]) < elapsed
            next_end = float(times[num_steps]) if num_steps < horizon else 0.0
        if num_steps < horizon and in_flight:
            self._state = _BUSY
            self._run_done = num_steps + 1
            self._wait(next_end - elapsed, self._end_run)
            return True
        if tail_only:
            return False
        self._state = _BUSY
        self._run_done = num_steps
        self._pending = None
        self._then = self._end_run
        self._work_done(now)
        return True

    def _end_run_whole(self, now: float) -> None:
        self._run_done = self._run_horizon
        self._end_run(now)

    def _end_run(self, now: float) -> None:
        rep = self.replica
        self._state = _BUSY  # until _next: a wake-up during the reports below waits for it
        self._in_run = False
        outcome = rep.advance_decode(self._run_done)
        if self._deferred_aborts:
            for request_id in self._deferred_aborts:
                rep.abort_request(request_id)
            self._deferred_aborts.clear()
        self._report(outcome, now)
        self._run_times = None
        if self._detaching:
            self._detached(now)
        self._next(now)

    # ------------------------------------------------------------------ reports
    def _report(self, outcome: StepOutcome, now: float) -> None:
        """Tell ``events`` what a step or run produced: at once, or after the egress path and
        the frontend's output queue (not at all if the replica crashed meanwhile: the crash's
        report covers it)."""
        self._stamp(outcome, now)
        delay_s = self._egress_s
        if self._stream_cost_s > 0.0:
            delay_s += self._outputs_processed_s(outcome, now) - now
        if delay_s <= 0.0:
            self._deliver(outcome, now)
        elif outcome.first_token_ids or outcome.finished or self.token_reports == "step":
            crashes = self.num_crashes

            def deliver(_event: WakeUp) -> None:
                if self.num_crashes == crashes:
                    self._deliver(outcome, self.clock.now())

            self.clock.call_later(delay_s, deliver)

    def _outputs_processed_s(self, outcome: StepOutcome, now: float) -> float:
        """When the frontend's output queue has processed what ``outcome`` produced: each
        step's outputs, ``stream_cost_s`` per request with a token, queue behind the steps
        before them. The steps of a decode run are queued at their own end times (as priced
        when the run began: a stall during the run is not counted)."""
        work = self._stream_cost_s * (len(outcome.bulk_ids) + len(outcome.token_counts))
        num_steps = outcome.num_steps
        free = self._outputs_free_s
        if num_steps > 1:
            start = self._run_start_s
            if self._run_times is None:
                first, increment = self._run_linear
                # step times grow (increment >= 0), so the queue is longest after the first
                # step's outputs or after the last's
                last = start + linear_run_end_s(first, increment, num_steps)
                free = max(max(free, start + first) + num_steps * work, last + work)
            else:
                ends = start + self._run_times[:num_steps]
                backlog = work * np.arange(num_steps, 0, -1)
                free = max(free + num_steps * work, float(np.max(ends + backlog)))
        else:
            free = max(free, now) + work
        self._outputs_free_s = free
        return free

    def _stamp(self, outcome: StepOutcome, now: float) -> None:
        """The engine's own times of the first tokens and finishes in ``outcome``."""
        for rid in outcome.first_token_ids:
            req = self.replica.get(rid)
            if req is not None:
                req.first_token_time_s = now
        for req in outcome.finished:
            req.finish_time_s = now
            if req.first_token_time_s is None:
                req.first_token_time_s = now

    def _deliver(self, outcome: StepOutcome, now: float) -> None:
        iid, events, phases = self.instance_id, self.events, self._phases
        for rid in outcome.first_token_ids:
            phase = phases.get(rid)
            if phase is not None and phase is not Phase.PREFILL:
                events.on_first_token(rid, iid, now)
        if self.token_reports == "step":
            first = set(outcome.first_token_ids)
            for rid, num in outcome.new_token_counts.items():
                phase = phases.get(rid)
                if rid not in first and phase is not None and phase is not Phase.PREFILL:
                    events.on_tokens(rid, iid, num, now)
        for req in outcome.finished:
            if req.request_id in phases:  # else aborted meanwhile: nothing more is reported
                self._report_finish(req, now)

    def _report_finish(self, req: SimRequest, now: float) -> None:
        rid, iid = req.request_id, self.instance_id
        phase = self._phases.pop(rid)
        if phase is Phase.PREFILL:
            self.events.on_prefill_done(rid, iid, now)
            return
        extras = {
            "num_preemptions": float(req.num_preemptions),
            "num_prefix_hit_tokens": float(req.num_prefix_hit_tokens),
        }
        if req.kv_arrival_s is not None:
            extras["kv_transfer_end_s"] = req.kv_arrival_s
        self.events.on_finish(rid, iid, req.num_output_tokens, now, extras)

    # ------------------------------------------------------------------ faults
    def _fail_later(self, request_id: str) -> None:
        """A black hole: the request fails ``fail_after_s`` from now, unless aborted."""
        self._doomed.add(request_id)

        def fail(_event: WakeUp) -> None:
            if request_id not in self._doomed:
                return
            self._doomed.discard(request_id)
            del self._phases[request_id]
            now = self.clock.now()
            reason = f"instance {self.instance_id} failed the request (fail fault)"
            self.events.on_failure(request_id, self.instance_id, reason, now)

        self.clock.call_later(self._fail_after_s, fail)

    def _fault(self, fault: Fault) -> Generator[simpy.Event, Any, None]:
        env = self.env
        if fault.at_s > env.now:
            yield env.timeout(fault.at_s - env.now)
        duration = _INF if fault.duration_s is None else fault.duration_s
        if fault.kind == "crash":
            self.crash(f"crash fault at {fault.at_s}s", comes_back=duration < _INF)
            if duration < _INF:
                yield env.timeout(duration)
                self.recover()
        elif fault.kind == "crashloop":
            self._crashloop_until_s = max(self._crashloop_until_s, env.now + duration)
            self._crash_after_s = fault.fail_after_s
            self.crash(f"crash loop from {fault.at_s}s", comes_back=False)
        elif fault.kind == "fail":
            self._failing_until_s = max(self._failing_until_s, env.now + duration)
            self._fail_after_s = fault.fail_after_s
        elif fault.kind == "link":
            return  # the cluster's hand-offs see it (ClusterSimulation.link_break)
        elif fault.kind == "stall":
            self._stalled_until_s = max(self._stalled_until_s, env.now + duration)
            if self._step_start_s is not None:
                self._stall_debt_s += duration
            self._poke()
        else:
            self._slowdown *= fault.factor
            self._poke()
            if duration < _INF:
                yield env.timeout(duration)
                self._slowdown /= fault.factor
                self._poke()

    def crash(self, reason: str = "crashed", comes_back: bool = False) -> None:
        """Lose every request and the KV cache; the control plane hears it once.
        ``comes_back``: a fault brings the replica back by itself (else only ``recover``,
        a restart, does)."""
        if not self.is_up:
            return
        now = self.clock.now()
        self.num_crashes += 1
        self._go_down(now)
        self.events.on_instance_failure(self.instance_id, reason, now)
        if self.on_crash is not None:
            self.on_crash(self.instance_id, now, comes_back)

    def shut_down(self) -> None:
        """Stop for good, unreported (the instance was unregistered): the work in flight is
        dropped, so no step scheduled before ends on an emptied replica."""
        if self.is_up:
            self._go_down(self.clock.now())

    def _go_down(self, now: float) -> None:
        if self._step_start_s is not None:
            self._busy_s += now - self._step_start_s
            self._step_start_s = None
        self.replica.clear()
        self._phases.clear()
        self._arriving.clear()
        self._doomed.clear()
        self._detaching.clear()
        self._in_run = False
        self._deferred_aborts.clear()
        self._state = _IDLE
        self._pending = self._then = self._plan = self._run_times = None  # the work is lost
        self._inputs_free_s = self._outputs_free_s = -_INF  # the frontend goes down with it
        self.is_up = False
        self._stall_debt_s = 0.0
        self._stalled_until_s = -_INF

    def recover(self) -> None:
        """Back up, empty (a fresh engine with a cold cache)."""
        if self.is_up:
            return
        self.is_up = True
        now = self.clock.now()
        self.events.on_instance_recovered(self.instance_id, now)
        self._poke()
        if now < self._crashloop_until_s:  # the cause is still there: down again soon
            crashes = self.num_crashes

            def crash_again(_event: WakeUp) -> None:
                if self.num_crashes == crashes:  # not already down (and up) again since
                    self.crash(f"crash loop: down again {self._crash_after_s}s after a restart")

            self.clock.call_later(self._crash_after_s, crash_again)
