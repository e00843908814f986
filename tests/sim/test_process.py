"""The replica's SimPy process: event times, cut decode runs, PD phases, faults, snapshots."""

from __future__ import annotations

import pytest
import simpy

from backends.sim.faults import Fault
from backends.sim.process import ReplicaProcess
from backends.sim.request import SimRequest
from cpsim.latency import StepBatch
from cpsim.profiles import ProfiledLatencyModel
from cpsim.views import Phase
from tests.sim.conftest import WithFrontend, make_replica


class Recorder:
    """An EngineEvents sink that records (event, request or instance, time, extra)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []  # type: ignore[type-arg]

    def on_first_token(self, request_id, instance_id, now) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("first", request_id, now))

    def on_tokens(self, request_id, instance_id, num_tokens, now) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("tokens", request_id, now, num_tokens))

    def on_prefill_done(self, request_id, instance_id, now) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("prefill_done", request_id, now))

    def on_finish(self, request_id, instance_id, num_output_tokens, now, extras=None) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("finish", request_id, now, num_output_tokens, dict(extras or {})))

    def on_failure(  # type: ignore[no-untyped-def]
        self, request_id, instance_id, reason, now, retryable=True, instance_fault=True
    ) -> None:
        self.log.append(("failure", request_id, now, retryable))

    def on_instance_failure(self, instance_id, reason, now) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("instance_failure", instance_id, now))

    def on_instance_recovered(self, instance_id, now) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("instance_recovered", instance_id, now))

    def on_snapshot(self, snapshot, now) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("snapshot", snapshot.instance_id, now))

    def times(self, kind: str) -> dict[str, float]:
        return {e[1]: e[2] for e in self.log if e[0] == kind}


def setup(latency, **kwargs):  # type: ignore[no-untyped-def]
    env = simpy.Environment()
    events = Recorder()
    proc = ReplicaProcess(env, make_replica(latency, **kwargs.pop("replica", {})), events, **kwargs)
    return env, proc, events


def submit_at(env, proc, at_s, req, phase=Phase.FULL):  # type: ignore[no-untyped-def]
    def go():  # type: ignore[no-untyped-def]
        yield env.timeout(at_s)
        proc.submit(req, phase)
    env.process(go())


def lone_finish_s(latency, prompt, out, start=0.0):  # type: ignore[no-untyped-def]
    t = start + latency.step_time_s(StepBatch(prompt, prompt**2, 0, 1))
    first = t
    for i in range(1, out):
        t += latency.step_time_s(StepBatch(num_decode_seqs=1, decode_context_tokens=prompt + i))
    return first, t


def test_lone_request_reports_first_token_and_finish_at_priced_times(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(latency)
    submit_at(env, proc, 1.0, SimRequest("a", 400, 30))
    env.run()
    first, finish = lone_finish_s(latency, 400, 30, start=1.0)
    assert events.times("first")["a"] == pytest.approx(first)
    assert events.times("finish")["a"] == pytest.approx(finish)
    done = next(e for e in events.log if e[0] == "finish")
    assert done[3] == 30 and done[4] == {"num_preemptions": 0.0, "num_prefix_hit_tokens": 0.0}
    assert not [e for e in events.log if e[0] == "tokens"]  # the count comes with on_finish


def workload(env, proc):  # type: ignore[no-untyped-def]
    for i in range(12):
        submit_at(env, proc, 0.137 * i, SimRequest(f"r{i}", 100 + 37 * i, 20 + 5 * i))


@pytest.mark.parametrize("token_reports", ["finish", "step"])
def test_decode_runs_cut_by_arrivals_give_the_single_step_times(latency, token_reports) -> None:  # type: ignore[no-untyped-def]
    logs = []
    for runs in (False, True):
        env, proc, events = setup(latency, use_decode_runs=runs, token_reports=token_reports,
                                  replica={"num_blocks": 120})
        workload(env, proc)
        env.run()
        logs.append(events)
    slow, fast = logs
    for kind in ("first", "finish"):
        assert slow.times(kind).keys() == fast.times(kind).keys()
        for rid, t in slow.times(kind).items():
            assert fast.times(kind)[rid] == pytest.approx(t, rel=1e-9)
    total = {e[1]: e[3] for e in fast.log if e[0] == "finish"}
    assert all(n == 20 + 5 * int(rid[1:]) for rid, n in total.items())
    if token_reports == "step":  # the steps' token reports add up too (the first token apart)
        total = {rid: 0 for rid in slow.times("finish")}
        for e in fast.log:
            if e[0] == "tokens":
                total[e[1]] += e[3]
        assert all(n + 1 == 20 + 5 * int(rid[1:]) for rid, n in total.items())


def test_prefill_phase_reports_prefill_done_and_frees_blocks(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(latency)
    submit_at(env, proc, 0.0, SimRequest("p", 300, 1), Phase.PREFILL)
    env.run()
    assert events.times("prefill_done")["p"] == pytest.approx(
        latency.step_time_s(StepBatch(300, 300**2, 0, 1)))
    assert not events.times("first") and not events.times("finish")
    assert proc.replica.num_free_blocks == proc.replica.pool.num_blocks


def test_decode_phase_first_token_after_one_decode_step(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(latency)
    submit_at(env, proc, 0.0, SimRequest("d", 300, 5, prompt_cached=True), Phase.DECODE)
    env.run()
    assert events.times("first")["d"] == pytest.approx(
        latency.step_time_s(StepBatch(num_decode_seqs=1, decode_context_tokens=300)))
    assert [e[3] for e in events.log if e[0] == "finish"] == [5]


def test_phase_and_request_must_agree(latency) -> None:  # type: ignore[no-untyped-def]
    _env, proc, _ = setup(latency)
    with pytest.raises(ValueError, match="max_tokens=1"):
        proc.submit(SimRequest("p", 10, 5), Phase.PREFILL)
    with pytest.raises(ValueError, match="prompt_cached"):
        proc.submit(SimRequest("d", 10, 5), Phase.DECODE)


def test_a_request_larger_than_the_cache_fails_without_retry(latency) -> None:  # type: ignore[no-untyped-def]
    _env, proc, events = setup(latency, replica={"num_blocks": 4})
    proc.submit(SimRequest("huge", 1000, 10), Phase.FULL)
    assert events.log[0][:2] == ("failure", "huge") and events.log[0][3] is False


def test_abort_reports_nothing_more(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(latency)
    submit_at(env, proc, 0.0, SimRequest("a", 100, 500))
    env.run(until=0.5)
    assert proc.abort("a") and not proc.abort("a")
    env.run()
    assert "a" in events.times("first") and not events.times("finish")
    assert proc.replica.num_free_blocks == proc.replica.pool.num_blocks


def test_crash_loses_requests_reports_once_and_recovers_empty(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(latency)
    for i in range(3):
        submit_at(env, proc, 0.0, SimRequest(f"r{i}", 200, 1000))
    proc.add_fault(Fault("crash", at_s=1.0, duration_s=2.0))
    submit_at(env, proc, 1.5, SimRequest("during", 10, 2))
    submit_at(env, proc, 3.5, SimRequest("after", 10, 2))
    env.run()
    kinds = [e[0] for e in events.log]
    assert kinds.count("instance_failure") == 1 and kinds.count("instance_recovered") == 1
    assert events.times("instance_failure")["r0"] == 1.0
    assert events.times("instance_recovered")["r0"] == 3.0
    assert not any(e[0] == "finish" and e[1].startswith("r") for e in events.log)
    assert ("failure", "during", 1.5, True) in events.log
    assert "after" in events.times("finish")
    assert proc.replica.pool.num_cached == 0 and proc.is_up


def test_stall_delays_progress_by_its_length(latency) -> None:  # type: ignore[no-untyped-def]
    _, finish = lone_finish_s(latency, 400, 30)
    env, proc, events = setup(latency)
    submit_at(env, proc, 0.0, SimRequest("a", 400, 30))
    proc.add_fault(Fault("stall", at_s=0.1, duration_s=0.5))
    snapshots = []
    env.process(_scrape(env, proc, snapshots))
    env.run()
    assert events.times("finish")["a"] == pytest.approx(finish + 0.5)
    assert any(0.1 < s.time_s < 0.6 for s in snapshots)


def _scrape(env, proc, out):  # type: ignore[no-untyped-def]
    for _ in range(20):
        yield env.timeout(0.05)
        out.append(proc.snapshot())


def test_stall_when_idle_holds_new_work_until_it_ends(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(latency)
    proc.add_fault(Fault("stall", at_s=0.0, duration_s=1.0))
    submit_at(env, proc, 0.5, SimRequest("a", 400, 30))
    env.run()
    first, _ = lone_finish_s(latency, 400, 30, start=1.0)
    assert events.times("first")["a"] == pytest.approx(first)


def test_slowdown_multiplies_step_times_while_it_lasts(latency) -> None:  # type: ignore[no-untyped-def]
    first, finish = lone_finish_s(latency, 400, 30)
    env, proc, events = setup(latency)
    proc.add_fault(Fault("slowdown", at_s=0.0, duration_s=100.0, factor=3.0))
    submit_at(env, proc, 0.0, SimRequest("a", 400, 30))
    env.run()
    assert events.times("first")["a"] == pytest.approx(3 * first)
    assert events.times("finish")["a"] == pytest.approx(3 * finish)


def test_snapshot_reports_load_cache_and_busy_fraction(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, _ = setup(latency)
    for i in range(3):
        submit_at(env, proc, 0.0, SimRequest(f"r{i}", 500, 100))
    env.run(until=0.2)
    snap = proc.snapshot()
    assert snap.num_running == 3 and snap.num_waiting == 0 and snap.is_healthy
    assert 0 < snap.kv_cache_usage_frac < 1 and snap.gpu_utilization_frac == pytest.approx(1.0)
    env.run()
    env.run(until=env.now + 10.0)
    assert proc.snapshot().gpu_utilization_frac < 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "explode", "at_s": 1.0}, "kind"),
        ({"kind": "stall", "at_s": -1.0}, "at_s"),
        ({"kind": "slowdown", "at_s": 0.0, "factor": 0.5}, "factor"),
        ({"kind": "crash", "at_s": 0.0, "duration_s": 0.0}, "duration_s"),
    ],
)
def test_bad_faults_name_the_field(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        Fault(**kwargs)


# ------------------------------------------------------------------ the serving path
INGRESS_S, EGRESS_S = 0.003, 0.002


def with_path(latency):  # type: ignore[no-untyped-def]
    return ProfiledLatencyModel(latency.model, latency.hardware, latency.coefficients,
                                ingress_s=INGRESS_S, egress_s=EGRESS_S)


@pytest.mark.parametrize("token_reports", ["finish", "step"])
def test_serving_path_delays_admission_and_every_report(latency, token_reports) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(with_path(latency), token_reports=token_reports)
    submit_at(env, proc, 1.0, SimRequest("a", 400, 30))
    env.run()
    first, finish = lone_finish_s(latency, 400, 30, start=1.0 + INGRESS_S)
    assert events.times("first")["a"] == pytest.approx(first + EGRESS_S)
    assert events.times("finish")["a"] == pytest.approx(finish + EGRESS_S)
    if token_reports == "step":  # the decode run's tokens arrive one egress after it
        ticks = [e for e in events.log if e[0] == "tokens"]
        assert sum(e[3] for e in ticks) == 29
        assert ticks[-1][2] == pytest.approx(finish + EGRESS_S)


def test_without_a_serving_path_nothing_is_delayed(latency) -> None:  # type: ignore[no-untyped-def]
    zero = ProfiledLatencyModel(latency.model, latency.hardware, latency.coefficients,
                                ingress_s=0.0, egress_s=0.0)
    env, proc, events = setup(zero)
    submit_at(env, proc, 1.0, SimRequest("a", 400, 30))
    env.run()
    first, finish = lone_finish_s(latency, 400, 30, start=1.0)
    assert events.times("first")["a"] == first and events.times("finish")["a"] == finish


def test_abort_on_the_ingress_path_never_reaches_the_engine(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(with_path(latency))
    proc.submit(SimRequest("a", 100, 5), Phase.FULL)
    env.run(until=INGRESS_S / 2)
    assert proc.abort("a") and not proc.abort("a")
    env.run()
    assert not [e for e in events.log if e[0] != "snapshot"]
    assert proc.replica.num_steps == 0 and not proc.replica.has_work


def test_crash_on_the_egress_path_drops_the_undelivered_report(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(with_path(latency))
    proc.submit(SimRequest("a", 100, 1), Phase.FULL)
    done_s = INGRESS_S + latency.step_time_s(StepBatch(100, 100**2, 0, 1))
    proc.add_fault(Fault("crash", at_s=done_s + EGRESS_S / 2, duration_s=1.0))
    submit_at(env, proc, 0.5, SimRequest("b", 100, 1))  # while the replica is down
    env.run()
    kinds = [(e[0], e[1]) for e in events.log if e[0] != "snapshot"]
    assert ("finish", "a") not in kinds and ("first", "a") not in kinds
    assert kinds.count(("instance_failure", "r0")) == 1
    assert ("failure", "b") in kinds  # submitted while down


def test_crash_on_the_ingress_path_loses_the_request_once(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(with_path(latency))
    proc.add_fault(Fault("crash", at_s=INGRESS_S / 2, duration_s=INGRESS_S / 4))
    proc.submit(SimRequest("a", 100, 1), Phase.FULL)
    env.run()
    kinds = [(e[0], e[1]) for e in events.log if e[0] != "snapshot"]
    assert kinds == [("instance_failure", "r0"), ("instance_recovered", "r0")]
    assert not proc.replica.has_work and proc.replica.num_steps == 0


def test_a_report_on_the_egress_path_at_a_crash_never_reaches_the_retry(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(with_path(latency))
    proc.submit(SimRequest("a", 100, 1), Phase.FULL)
    step_s = latency.step_time_s(StepBatch(100, 100**2, 0, 1))
    done_s = INGRESS_S + step_s
    # crash and recover while a's finish is on its way out; the retry arrives before it lands
    proc.add_fault(Fault("crash", at_s=done_s + EGRESS_S / 4, duration_s=EGRESS_S / 4))
    submit_at(env, proc, done_s + 3 * EGRESS_S / 4, SimRequest("a", 100, 1))
    env.run()
    retry_first = done_s + 3 * EGRESS_S / 4 + INGRESS_S + step_s + EGRESS_S
    assert [e[2] for e in events.log if e[:2] == ("first", "a")] == pytest.approx([retry_first])
    assert [e[2] for e in events.log if e[:2] == ("finish", "a")] == pytest.approx([retry_first])


# ------------------------------------------------------------------ the frontend's queues
def test_the_frontend_takes_requests_in_one_at_a_time(latency) -> None:  # type: ignore[no-untyped-def]
    env, proc, events = setup(WithFrontend(latency, request_s=0.01))
    for rid in "abc":
        submit_at(env, proc, 1.0, SimRequest(rid, 400, 30))
    env.run(until=1.025)
    assert proc.replica.get("b") is not None and proc.replica.get("c") is None
    env.run()
    first, _ = lone_finish_s(latency, 400, 30, start=1.01)
    assert events.times("first")["a"] == pytest.approx(first)  # alone on the engine until 1.02


@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize("use_decode_runs", [True, False])
@pytest.mark.parametrize("stream_ms", [0.5, 40.0])  # keeping up with the steps; falling behind
def test_the_frontend_processes_each_steps_outputs_in_turn(  # type: ignore[no-untyped-def]
    latency, closed_form, use_decode_runs, stream_ms
) -> None:
    stream_s = stream_ms / 1e3
    model = WithFrontend(latency, stream_s=stream_s, closed_form=closed_form)
    env, proc, events = setup(model, use_decode_runs=use_decode_runs)
    submit_at(env, proc, 1.0, SimRequest("a", 400, 30))
    env.run()
    # the engine's step ends; the frontend works through them one after another
    ends = [1.0 + latency.step_time_s(StepBatch(400, 400**2, 0, 1))]
    for i in range(1, 30):
        ends.append(ends[-1] + latency.step_time_s(
            StepBatch(num_decode_seqs=1, decode_context_tokens=400 + i)))
    processed, free = [], -1.0
    for end in ends:
        free = max(free, end) + stream_s
        processed.append(free)
    assert events.times("first")["a"] == pytest.approx(processed[0])
    assert events.times("finish")["a"] == pytest.approx(processed[-1])
    assert proc.replica.num_steps == 30


def test_a_crash_empties_the_frontends_queues(latency) -> None:  # type: ignore[no-untyped-def]
    """Outputs queued behind a crashed engine's backlog are lost with it; a request after
    the restart waits for nothing."""
    env, proc, events = setup(WithFrontend(latency, request_s=0.5, stream_s=0.5))
    for rid in "abcd":
        submit_at(env, proc, 0.0, SimRequest(rid, 100, 5))
    proc.add_fault(Fault("crash", at_s=0.6, duration_s=0.1))
    submit_at(env, proc, 1.0, SimRequest("e", 100, 1))
    env.run()
    first, _ = lone_finish_s(latency, 100, 1, start=1.5)
    assert events.times("first")["e"] == pytest.approx(first + 0.5)
