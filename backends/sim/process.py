"""The SimPy process of one simulated replica: steps in virtual time, events, faults."""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any, Literal

import numpy as np
import simpy

from backends.sim.decode_set import linear_run_end_s, linear_run_steps_done
from backends.sim.faults import Fault
from backends.sim.replica import SimReplica
from backends.sim.request import SimRequest
from backends.sim.step import StepOutcome
from cpsim.backend import EngineEvents
from cpsim.validation import check_choice
from cpsim.views import InstanceSnapshot, Phase

TokenReports = Literal["finish", "step"]
_INF = math.inf


class ReplicaProcess:
    """Drives a SimReplica in a SimPy environment (seconds) and reports to ``events``.

    Idle, it waits for a wake-up (submit, abort, fault). With work, it runs either one step
    (schedule, wait the priced step time, apply) or, when the next steps are a pure decode run,
    the whole run in one wait that a wake-up cuts short: the step in progress then finishes
    (a real engine finishes its step before admitting) and the run stops there.

    ``token_reports="finish"`` reports the first token at its exact time and the remaining
    tokens in one ``on_tokens`` call just before ``on_finish`` (cheap: no per-step calls);
    ``"step"`` reports tokens after every step or run. ``use_decode_runs=False`` runs every
    step on its own (slower; the same results, for tests)."""

    def __init__(
        self,
        env: simpy.Environment,
        replica: SimReplica,
        events: EngineEvents,
        token_reports: TokenReports = "finish",
        use_decode_runs: bool = True,
    ) -> None:
        check_choice("token_reports", token_reports, ("finish", "step"))
        self.env = env
        self.replica = replica
        self.events = events
        self.instance_id = replica.instance_id
        self.token_reports = token_reports
        self.use_decode_runs = use_decode_runs
        self.is_up = True
        self.num_crashes = 0
        self._phases: dict[str, Phase] = {}
        self._wake = env.event()
        self._start_s = float(env.now)
        self._busy_s = 0.0
        self._step_start_s: float | None = None
        self._slowdown = 1.0
        self._stalled_until_s = -_INF
        self._stall_debt_s = 0.0
        self._timer: simpy.Event | None = None
        self._in_run = False
        self._deferred_aborts: list[str] = []
        self._proc = env.process(self._loop())

    # ------------------------------------------------------------------ inputs
    def submit(self, req: SimRequest, phase: Phase) -> None:
        """Start ``phase`` of a request: FULL generates ``max_tokens``; PREFILL (max_tokens must
        be 1) computes the prompt and reports ``on_prefill_done``; DECODE (``prompt_cached``)
        continues from a handed-off KV cache and generates ``max_tokens``."""
        if phase is Phase.PREFILL and req.max_tokens != 1:
            raise ValueError(f"a PREFILL request needs max_tokens=1, got {req.max_tokens}")
        if phase is Phase.DECODE and not req.prompt_cached:
            raise ValueError("a DECODE request needs prompt_cached=True (its KV is handed off)")
        now = self.env.now
        reason = self._cannot_serve(req)
        if reason is not None:
            self.events.on_failure(req.request_id, self.instance_id, reason, now, not self.is_up)
            return
        if req.arrival_time_s == 0.0:
            req.arrival_time_s = float(now)
        self.replica.add_request(req)
        self._phases[req.request_id] = phase
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
        if self._in_run:  # a decode run in flight: the abort applies when it stops
            self._deferred_aborts.append(request_id)
        else:
            self.replica.abort_request(request_id)
        self._poke()
        return True

    def add_fault(self, fault: Fault) -> None:
        """Schedule a fault on this replica (at ``fault.at_s``)."""
        self.env.process(self._fault(fault))

    schedule_fault = add_fault

    def snapshot(self, now: float | None = None) -> InstanceSnapshot:
        """What a scrape of the engine's metrics would show now."""
        now = float(self.env.now if now is None else now)
        rep = self.replica
        busy = self._busy_s
        if self._step_start_s is not None:
            busy += now - self._step_start_s
        elapsed = now - self._start_s
        return InstanceSnapshot(
            instance_id=self.instance_id,
            time_s=now,
            num_running=rep.num_running,
            num_waiting=rep.num_waiting,
            kv_cache_usage_frac=rep.kv_cache_usage_frac,
            prefix_cache_hit_rate=rep.prefix_cache_hit_rate,
            gpu_utilization_frac=min(1.0, busy / elapsed) if elapsed > 0 else 0.0,
            is_healthy=self.is_up,
        )

    @property
    def is_stalled(self) -> bool:
        return self.env.now < self._stalled_until_s

    @property
    def slowdown(self) -> float:
        return self._slowdown

    # ------------------------------------------------------------------ the loop
    def _poke(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def _new_wake(self) -> simpy.Event:
        self._wake = self.env.event()
        return self._wake

    def _loop(self) -> Generator[simpy.Event, Any, None]:
        while True:
            try:
                yield from self._serve()
            except simpy.Interrupt:
                self._step_start_s = None  # crashed: the work in flight is lost

    def _serve(self) -> Generator[simpy.Event, Any, None]:
        env, rep = self.env, self.replica
        while True:
            if not self.is_up or not rep.has_work:
                yield self._new_wake()
            elif env.now < self._stalled_until_s:
                wake = self._new_wake()
                if self._stalled_until_s < _INF:
                    yield env.timeout(self._stalled_until_s - env.now) | wake
                else:
                    yield wake
            else:
                horizon = rep.decode_horizon() if self.use_decode_runs else 0
                if horizon >= 2:
                    yield from self._decode_run(horizon)
                else:
                    yield from self._one_step()

    def _one_step(self) -> Generator[simpy.Event, Any, None]:
        rep = self.replica
        plan = rep.schedule()
        if plan.is_empty:  # nothing admissible and nothing running: wait for a change
            rep.update_from_output(plan)
            yield self._new_wake()
            return
        duration = rep.latency.step_time_s(plan.batch) * self._slowdown
        start = self._step_start_s = self.env.now
        yield self.env.timeout(duration)
        if self._stall_debt_s > 0:
            yield from self._pay_stalls(start)
        else:
            self._busy_s += self.env.now - start
            self._step_start_s = None
        self._report(rep.update_from_output(plan))

    def _decode_run(self, horizon: int) -> Generator[simpy.Event, Any, None]:
        env, rep, scale = self.env, self.replica, self._slowdown
        linear = rep.decode_run_linear_s(horizon)
        times: np.ndarray | None = None
        if linear is not None:
            first, increment = linear[0] * scale, linear[1] * scale
            total = linear_run_end_s(first, increment, horizon)
        else:
            times = rep.decode_run_times_s(horizon) * scale
            total = float(times[-1])
        start = self._step_start_s = env.now
        self._in_run = True
        wake = self._new_wake()
        timer = self._timer = env.timeout(total)
        timer.callbacks.append(self._on_timer)
        yield wake
        num_steps = horizon
        if not timer.processed:  # woken early: the step in flight finishes, then the run stops
            self._timer = None
            elapsed = env.now - start
            if times is None:
                num_steps = linear_run_steps_done(first, increment, elapsed)
                step_end = linear_run_end_s(first, increment, num_steps)
                in_flight = num_steps == 0 or step_end < elapsed
                next_end = linear_run_end_s(first, increment, num_steps + 1)
            else:
                num_steps = int(np.searchsorted(times, elapsed, side="right"))
                in_flight = num_steps == 0 or times[num_steps - 1] < elapsed
                next_end = float(times[num_steps]) if num_steps < horizon else 0.0
            if num_steps < horizon and in_flight:
                yield env.timeout(next_end - elapsed)
                num_steps += 1
        if self._stall_debt_s > 0:
            yield from self._pay_stalls(start)
        else:
            self._busy_s += env.now - start
            self._step_start_s = None
        self._in_run = False
        outcome = rep.advance_decode(num_steps)
        if self._deferred_aborts:
            for request_id in self._deferred_aborts:
                rep.abort_request(request_id)
            self._deferred_aborts.clear()
        self._report(outcome)

    def _on_timer(self, event: simpy.Event) -> None:
        if event is self._timer:
            self._timer = None
            self._poke()

    def _pay_stalls(self, start: float) -> Generator[simpy.Event, Any, None]:
        """A stall that began during the step delays its end by the stall's length."""
        while self._stall_debt_s > 0:
            debt, self._stall_debt_s = self._stall_debt_s, 0.0
            yield self.env.event() if debt == _INF else self.env.timeout(debt)
        self._busy_s += self.env.now - start
        self._step_start_s = None

    # ------------------------------------------------------------------ reports
    def _report(self, outcome: StepOutcome) -> None:
        now, iid, events, phases = self.env.now, self.instance_id, self.events, self._phases
        for rid in outcome.first_token_ids:
            req = self.replica.get(rid)
            if req is not None:
                req.first_token_time_s = now
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
        req.finish_time_s = now
        if req.first_token_time_s is None:
            req.first_token_time_s = now
        phase = self._phases.pop(rid)
        if phase is Phase.PREFILL:
            self.events.on_prefill_done(rid, iid, now)
            return
        num_out = req.num_output_tokens
        if self.token_reports == "finish" and num_out > 1:
            self.events.on_tokens(rid, iid, num_out - 1, now)
        extras = {
            "num_preemptions": float(req.num_preemptions),
            "num_prefix_hit_tokens": float(req.num_prefix_hit_tokens),
        }
        self.events.on_finish(rid, iid, num_out, now, extras)

    # ------------------------------------------------------------------ faults
    def _fault(self, fault: Fault) -> Generator[simpy.Event, Any, None]:
        env = self.env
        if fault.at_s > env.now:
            yield env.timeout(fault.at_s - env.now)
        duration = _INF if fault.duration_s is None else fault.duration_s
        if fault.kind == "crash":
            self.crash(f"crash fault at {fault.at_s}s")
            if duration < _INF:
                yield env.timeout(duration)
                self.recover()
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

    def crash(self, reason: str = "crashed") -> None:
        """Lose every request and the KV cache; the control plane hears it once."""
        if not self.is_up:
            return
        now = self.env.now
        if self._step_start_s is not None:
            self._busy_s += now - self._step_start_s
            self._step_start_s = None
        self.num_crashes += 1
        self.replica.clear()
        self._phases.clear()
        self._in_run = False
        self._deferred_aborts.clear()
        self.is_up = False
        self._stall_debt_s = 0.0
        self._stalled_until_s = -_INF
        self.events.on_instance_failure(self.instance_id, reason, now)
        if self._proc.is_alive and self._proc is not self.env.active_process:
            self._proc.interrupt(reason)

    def recover(self) -> None:
        """Back up, empty (a fresh engine with a cold cache)."""
        if self.is_up:
            return
        self.is_up = True
        self.events.on_instance_recovered(self.instance_id, self.env.now)
        self._poke()
