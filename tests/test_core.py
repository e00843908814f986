"""The sans-I/O control plane: lifecycle, dispatch limits, cancel, failures, PD hand-off, and
the invariant that every accepted request ends in exactly one terminal state."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cpsim import (
    Abort,
    ControlPlane,
    ControlPlaneConfig,
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    LatencyEstimate,
    Phase,
    RequestMetadata,
    RequestStatus,
)
from policies import ROUTERS, SCHEDULING_POLICIES


class AlwaysPrefill:
    """A PD policy for tests: every request with more than one output token splits."""

    name = "always"

    def disaggregate(self, request, instances, now) -> bool:  # type: ignore[no-untyped-def]
        return request.max_tokens > 1


def make_cp(**config) -> ControlPlane:  # type: ignore[no-untyped-def]
    return ControlPlane(
        SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"](), config=ControlPlaneConfig(**config)
    )


def req(rid: str, **kw) -> RequestMetadata:  # type: ignore[no-untyped-def]
    kw.setdefault("num_prompt_tokens", 10)
    kw.setdefault("max_tokens", 4)
    return RequestMetadata(rid, **kw)


def test_dispatch_respects_capacity_and_health() -> None:
    cp = make_cp()
    cp.add_instance(ExecutionInstance("a", max_concurrent_requests=2), 0.0)
    cp.add_instance(ExecutionInstance("b", max_concurrent_requests=1, is_healthy=False), 0.0)
    for i in range(4):
        cp.on_arrival(req(f"r{i}"), 0.0)
    out = cp.dispatch(0.0)
    assert [(d.request_id, d.instance_id) for d in out] == [("r0", "a"), ("r1", "a")]
    assert cp.num_queued == 2
    cp.set_instance_health("b", True)
    assert [(d.request_id, d.instance_id) for d in cp.dispatch(0.1)] == [("r2", "b")]
    cp.on_finish("r0", 1.0, 4)
    assert [d.request_id for d in cp.dispatch(1.0)] == ["r3"]


class FixedTPOT:
    """A latency model for tests: each instance's TPOT as given, in ms."""

    def __init__(self, tpot_ms: dict[str, float]) -> None:
        self.tpot_ms = tpot_ms

    def predict(self, request, instance) -> LatencyEstimate:  # type: ignore[no-untyped-def]
        return LatencyEstimate(ttft_s=0.1, tpot_s=self.tpot_ms[instance.instance_id] / 1000.0)


def decode_instance(iid: str, target_ms: float | None) -> ExecutionInstance:
    return ExecutionInstance(
        iid,
        instance_type=ExecutionInstanceType.DECODING,
        decoding_config=DecodingConfig(target_latency_ms=target_ms, max_parallel_requests=200),
    )


@pytest.mark.parametrize(
    ("tpot_ms", "expected"),
    [
        ({"slow": 80.0, "fast": 20.0, "free": 90.0}, {"fast", "free"}),  # free has no target
        ({"slow": 80.0, "fast": 70.0, "free": 90.0}, {"free"}),
    ],
)
def test_a_decode_instance_over_its_tpot_target_gets_no_new_decode(
    tpot_ms: dict[str, float], expected: set[str]
) -> None:
    cp = ControlPlane(
        SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"](), latency_model=FixedTPOT(tpot_ms)
    )
    for iid, target in (("slow", 50.0), ("fast", 50.0), ("free", None)):
        cp.add_instance(decode_instance(iid, target), 0.0)
    for i in range(6):
        cp.on_arrival(req(f"r{i}"), 0.0)
    assert {d.instance_id for d in cp.dispatch(0.0)} == expected


def test_when_every_decode_instance_is_over_its_target_all_stay_candidates() -> None:
    cp = ControlPlane(
        SCHEDULING_POLICIES["fifo"](),
        ROUTERS["round_robin"](),
        latency_model=FixedTPOT({"a": 80.0, "b": 60.0}),
    )
    cp.add_instance(decode_instance("a", 50.0), 0.0)
    cp.add_instance(decode_instance("b", 50.0), 0.0)
    for i in range(4):
        cp.on_arrival(req(f"r{i}"), 0.0)
    assert {d.instance_id for d in cp.dispatch(0.0)} == {"a", "b"}


def test_model_name_must_match() -> None:
    cp = make_cp()
    cp.add_instance(ExecutionInstance("a", model_name="llama"), 0.0)
    cp.on_arrival(req("r0", model_name="mistral"), 0.0)
    cp.on_arrival(req("r1", model_name="llama"), 0.0)
    assert [d.request_id for d in cp.dispatch(0.0)] == ["r1"]
    assert cp.status("r0") is RequestStatus.QUEUED


def test_bounded_queue_rejects_with_reason() -> None:
    cp = make_cp(max_queue_len=1)
    assert cp.on_arrival(req("r0"), 0.0).accepted
    admission = cp.on_arrival(req("r1"), 0.0)
    assert not admission.accepted and "max_queue_len=1" in admission.reason
    rec = cp.metrics.records().set_index("request_id")
    assert rec.loc["r1", "status"] == "REJECTED"


def test_cancel_queued_and_running() -> None:
    cp = make_cp()
    cp.add_instance(ExecutionInstance("a", max_concurrent_requests=1), 0.0)
    cp.on_arrival(req("run"), 0.0)
    cp.on_arrival(req("wait"), 0.0)
    cp.dispatch(0.0)
    assert cp.cancel("wait", 0.5) is None
    abort = cp.cancel("run", 0.6)
    assert abort is not None and abort.instance_id == "a"
    cp.on_finish("run", 0.7, 4)  # a late event after the abort is ignored
    rec = cp.metrics.records().set_index("request_id")
    assert list(rec["status"]) == ["CANCELLED", "CANCELLED"]
    assert cp.instance_state("a").view().in_flight == 0
    with pytest.raises(ValueError, match="not an active request"):
        cp.cancel("run", 0.8)


@pytest.mark.parametrize(
    ("action", "tokens_before", "expected"),
    [
        ("requeue", 0, RequestStatus.QUEUED),
        ("requeue", 2, RequestStatus.FAILED),  # streamed tokens cannot be taken back
        ("fail", 0, RequestStatus.FAILED),
    ],
)
def test_instance_failure(action: str, tokens_before: int, expected: RequestStatus) -> None:
    cp = make_cp(on_instance_failure=action)
    cp.add_instance(ExecutionInstance("a"), 0.0)
    cp.on_arrival(req("r0"), 0.0)
    cp.dispatch(0.0)
    if tokens_before:
        cp.on_tokens("r0", tokens_before, 0.1, "a")
    assert cp.on_instance_failure("a", 0.2, "boom") == ["r0"]
    assert cp.status("r0") is expected or cp.metrics.records()["status"].iloc[0] == expected.name
    assert not cp.instance_views()[0].is_healthy


def test_requeue_is_bounded_by_max_attempts() -> None:
    cp = make_cp(max_attempts=2)
    cp.add_instance(ExecutionInstance("a"), 0.0)
    cp.on_arrival(req("r0"), 0.0)
    for t in range(3):
        cp.dispatch(float(t))
        cp.on_failure("r0", float(t) + 0.5, "engine error")
    rec = cp.metrics.records()
    assert rec["status"].tolist() == ["FAILED"] and rec["attempts"].tolist() == [2]
    assert rec["reason"].tolist() == ["engine error"]


def test_stale_event_from_previous_instance_is_ignored() -> None:
    cp = make_cp()
    cp.add_instance(ExecutionInstance("a"), 0.0)
    cp.add_instance(ExecutionInstance("b"), 0.0)
    cp.on_arrival(req("r0"), 0.0)
    first = cp.dispatch(0.0)[0].instance_id
    cp.on_failure("r0", 0.1, "lost", True, first)
    second = cp.dispatch(0.2)[0].instance_id
    assert second != first
    cp.on_finish("r0", 0.3, 4, first)  # stale
    assert cp.status("r0") is RequestStatus.RUNNING
    cp.on_finish("r0", 0.4, 4, second)
    assert cp.status("r0") is None


def test_queue_timeout_fails_with_reason() -> None:
    cp = make_cp(queue_timeout_s=1.0)
    cp.on_arrival(req("r0"), 0.0)
    cp.dispatch(2.0)
    assert cp.metrics.records()["reason"].tolist() == ["queued longer than 1.0 s"]


def test_pd_handoff_names_both_instances() -> None:
    cp = ControlPlane(SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"](), AlwaysPrefill())
    cp.add_instance(ExecutionInstance("p", instance_type=ExecutionInstanceType.PREFILLING), 0.0)
    cp.add_instance(ExecutionInstance("d", instance_type=ExecutionInstanceType.DECODING), 0.0)
    cp.on_arrival(req("long", max_tokens=8), 0.0)
    cp.on_arrival(req("short", max_tokens=1), 0.0)
    out = {d.request_id: d for d in cp.dispatch(0.0)}
    assert out["long"].phase is Phase.PREFILL and out["long"].instance_id == "p"
    assert out["short"].phase is Phase.FULL and out["short"].instance_id == "d"
    cp.on_prefill_done("long", 0.5, "p")
    (handoff,) = cp.dispatch(0.5)
    assert (handoff.phase, handoff.instance_id, handoff.source_instance_id) == (
        Phase.DECODE,
        "d",
        "p",
    )
    assert cp.instance_state("p").view().in_flight == 0
    cp.on_first_token("long", 0.6, "d")
    cp.on_finish("long", 1.0, 8, "d")
    row = cp.metrics.records().set_index("request_id").loc["long"]
    assert (row["prefill_instance_id"], row["decode_instance_id"]) == ("p", "d")
    assert row["ttft_ms"] == pytest.approx(600.0)


def _waiting_for_handoff(queue_timeout_s: float | None = None) -> ControlPlane:
    """One request prefilled on "p" and waiting for a decode instance ("d" is up, full)."""
    cp = ControlPlane(
        SCHEDULING_POLICIES["fifo"](),
        ROUTERS["round_robin"](),
        AlwaysPrefill(),
        ControlPlaneConfig(queue_timeout_s=queue_timeout_s),
    )
    cp.add_instance(ExecutionInstance("p", instance_type=ExecutionInstanceType.PREFILLING), 0.0)
    decode = ExecutionInstance(
        "d", instance_type=ExecutionInstanceType.DECODING, max_concurrent_requests=1
    )
    cp.add_instance(decode, 0.0)
    cp.on_arrival(req("fill", max_tokens=1), 0.0)  # runs whole on "d", filling it
    cp.on_arrival(req("long", max_tokens=8), 0.0)
    out = {d.request_id: (d.phase, d.instance_id) for d in cp.dispatch(0.0)}
    assert out == {"fill": (Phase.FULL, "d"), "long": (Phase.PREFILL, "p")}
    cp.on_prefill_done("long", 0.5, "p")
    assert cp.dispatch(0.5) == []
    return cp


def test_a_stale_finish_during_the_handoff_wait_is_ignored() -> None:
    # Found by the state machine below: the request was completed and still handed off later.
    cp = _waiting_for_handoff()
    cp.on_finish("long", 0.6, 1, "p")
    cp.on_first_token("long", 0.6, "p")
    assert cp.status("long") is RequestStatus.RUNNING
    cp.add_instance(ExecutionInstance("d2", instance_type=ExecutionInstanceType.DECODING), 0.7)
    (handoff,) = cp.dispatch(0.7)
    assert (handoff.phase, handoff.instance_id) == (Phase.DECODE, "d2")


def test_a_prefill_failure_during_the_handoff_wait_requeues_once() -> None:
    # Found by the state machine below: the request was queued and still waiting for hand-off.
    cp = _waiting_for_handoff()
    cp.on_failure("long", 0.6, "engine error", True, "p")
    assert cp.status("long") is RequestStatus.QUEUED
    assert cp.instance_state("p").view().in_flight == 0
    cp.add_instance(ExecutionInstance("d2", instance_type=ExecutionInstanceType.DECODING), 0.7)
    (again,) = cp.dispatch(0.7)  # a new prefill, no hand-off of the lost KV
    assert (again.phase, again.instance_id) == (Phase.PREFILL, "p")


def test_a_handoff_no_decode_instance_takes_fails_at_the_queue_timeout_and_frees_the_kv() -> None:
    cp = _waiting_for_handoff(queue_timeout_s=2.0)
    assert cp.dispatch(2.5) == [] and cp.take_aborts() == []  # waited 2.0 s: not yet
    cp.dispatch(2.6)
    assert cp.status("long") is None and cp.num_handoffs == 0
    assert cp.take_aborts() == [Abort("long", "p")]  # the prefill instance lets go of the KV
    assert cp.take_aborts() == []
    assert cp.instance_state("p").view().in_flight == 0
    (reason,) = cp.metrics.records()["reason"].tolist()
    assert reason == "prefilled on p, but no decode instance took it within 2.0 s"


@pytest.mark.parametrize("decode_state", ["absent", "down", "draining"])
def test_with_no_decode_instance_up_a_handoff_decodes_where_it_was_prefilled(
    decode_state: str,
) -> None:
    cp = ControlPlane(SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"](), AlwaysPrefill())
    cp.add_instance(ExecutionInstance("p", instance_type=ExecutionInstanceType.PREFILLING), 0.0)
    if decode_state != "absent":
        cp.add_instance(ExecutionInstance("d", instance_type=ExecutionInstanceType.DECODING), 0.0)
    cp.on_arrival(req("long", max_tokens=8), 0.0)
    (prefill,) = cp.dispatch(0.0)
    assert (prefill.phase, prefill.instance_id) == (Phase.PREFILL, "p")
    if decode_state == "down":
        cp.on_instance_failure("d", 0.2, "crashed")
    elif decode_state == "draining":
        cp.drain_instance("d")
    cp.on_prefill_done("long", 0.5, "p")
    (handoff,) = cp.dispatch(0.5)  # the KV is on "p": no transfer, no wait
    assert (handoff.phase, handoff.instance_id, handoff.source_instance_id) == (
        Phase.DECODE, "p", "p"
    )
    assert cp.instance_state("p").view().in_flight == 1
    cp.on_first_token("long", 0.6, "p")
    cp.on_finish("long", 0.9, 8, "p")
    row = cp.metrics.records().set_index("request_id").loc["long"]
    assert row["status"] == "COMPLETED"
    assert (row["prefill_instance_id"], row["decode_instance_id"]) == ("p", "p")


@pytest.mark.parametrize("decode_state", ["absent", "down", "draining", "up but full"])
def test_with_no_decode_instance_up_an_arrival_runs_whole_on_a_prefill_instance(
    decode_state: str,
) -> None:
    cp = ControlPlane(SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"](), AlwaysPrefill())
    cp.add_instance(ExecutionInstance("p", instance_type=ExecutionInstanceType.PREFILLING), 0.0)
    if decode_state != "absent":
        slots = 1 if decode_state == "up but full" else 8
        decode = ExecutionInstance(
            "d", instance_type=ExecutionInstanceType.DECODING, max_concurrent_requests=slots
        )
        cp.add_instance(decode, 0.0)
    if decode_state == "down":
        cp.on_instance_failure("d", 0.0, "crashed")
    elif decode_state == "draining":
        cp.drain_instance("d")
    elif decode_state == "up but full":
        cp.on_arrival(req("fill", max_tokens=1), 0.0)
        assert [(d.phase, d.instance_id) for d in cp.dispatch(0.0)] == [(Phase.FULL, "d")]
    cp.on_arrival(req("short", max_tokens=1), 0.1)  # not disaggregated: a whole request
    out = cp.dispatch(0.1)
    if decode_state == "up but full":  # it waits for the decode instance, which will take it
        assert out == [] and cp.status("short") is RequestStatus.QUEUED
        return
    assert [(d.request_id, d.phase, d.instance_id) for d in out] == [("short", Phase.FULL, "p")]


def test_cost_shares_add_up_to_busy_cost() -> None:
    cp = make_cp()
    cp.add_instance(ExecutionInstance("a", cost_per_gpu_hour=3600.0), 0.0)  # $1 per second
    cp.on_arrival(req("r0"), 0.0)
    cp.on_arrival(req("r1"), 0.0)
    cp.dispatch(0.0)
    cp.on_finish("r0", 1.0, 4)  # alone? no: shared with r1 for 1 s -> $0.5 each
    cp.on_finish("r1", 3.0, 4)  # then alone for 2 s -> +$2
    costs = cp.metrics.records().set_index("request_id")["cost_usd"]
    assert costs["r0"] == pytest.approx(0.5) and costs["r1"] == pytest.approx(2.5)


class CoreMachine(RuleBasedStateMachine):
    """Random arrivals, dispatches, engine events, cancels, instance churn and failures."""

    def __init__(self) -> None:
        super().__init__()
        self.cp = ControlPlane(
            SCHEDULING_POLICIES["fifo"](),
            ROUTERS["round_robin"](),
            AlwaysPrefill(),
            ControlPlaneConfig(max_queue_len=20, max_attempts=2),
        )
        self.now = 0.0
        self.submitted: set[str] = set()
        self.n = 0
        self.instances: set[str] = set()
        self.k = 0

    def tick(self) -> float:
        self.now += 0.1
        return self.now

    @rule(kind=st.sampled_from(list(ExecutionInstanceType)), cap=st.integers(1, 3))
    def add_instance(self, kind: ExecutionInstanceType, cap: int) -> None:
        self.k += 1
        iid = f"i{self.k}"
        self.cp.add_instance(
            ExecutionInstance(iid, instance_type=kind, max_concurrent_requests=cap), self.tick()
        )
        self.instances.add(iid)

    @precondition(lambda self: self.instances)
    @rule(data=st.data(), fail=st.booleans())
    def lose_instance(self, data: st.DataObject, fail: bool) -> None:
        iid = data.draw(st.sampled_from(sorted(self.instances)))
        if fail:
            self.cp.on_instance_failure(iid, self.tick(), "crash")
        else:
            self.cp.remove_instance(iid, self.tick())
            self.instances.discard(iid)

    @rule(max_tokens=st.integers(1, 3))
    def arrive(self, max_tokens: int) -> None:
        self.n += 1
        rid = f"r{self.n}"
        self.cp.on_arrival(req(rid, max_tokens=max_tokens), self.tick())
        self.submitted.add(rid)

    @rule()
    def dispatch(self) -> None:
        for d in self.cp.dispatch(self.tick()):
            assert self.cp.status(d.request_id) is RequestStatus.RUNNING

    @precondition(lambda self: self.cp.num_active)
    @rule(
        data=st.data(),
        event=st.sampled_from(["first", "tokens", "prefill", "finish", "fail", "cancel"]),
    )
    def engine_event(self, data: st.DataObject, event: str) -> None:
        rid = data.draw(st.sampled_from(sorted(self.cp.active_ids())))
        now = self.tick()
        state = self.cp.request_state(rid)
        assert state is not None
        iid = state.instance_id
        if event == "cancel":
            self.cp.cancel(rid, now)
        elif event == "first":
            self.cp.on_first_token(rid, now, iid)
        elif event == "tokens":
            self.cp.on_tokens(rid, 1, now, iid)
        elif event == "prefill":
            self.cp.on_prefill_done(rid, now, iid)
        elif event == "finish":
            self.cp.on_finish(rid, now, None, iid)
        else:
            self.cp.on_failure(rid, now, "engine error", True, iid)

    @invariant()
    def each_request_in_exactly_one_place(self) -> None:
        records = self.cp.metrics.records()
        finished = list(records["request_id"])
        assert len(finished) == len(set(finished)), "a request reached two terminal states"
        active = set(self.cp.active_ids())
        assert active.isdisjoint(finished)
        assert active | set(finished) == self.submitted, "a request vanished"

    @invariant()
    def in_flight_matches_assignments(self) -> None:
        on_instances: dict[str, int] = {}
        for rid in self.cp.active_ids():
            st_ = self.cp.request_state(rid)
            assert st_ is not None
            if st_.status is RequestStatus.RUNNING:
                assert st_.instance_id is not None
                on_instances[st_.instance_id] = on_instances.get(st_.instance_id, 0) + 1
            else:
                assert st_.status is RequestStatus.QUEUED and st_.instance_id is None
        for view in self.cp.instance_views():
            assert view.in_flight == on_instances.get(view.instance_id, 0)
            assert view.in_flight <= view.max_concurrent_requests
            assert view.pending_prefill_tokens >= 0

    def teardown(self) -> None:
        self.cp.fail_all(self.tick(), "shutdown")
        records = self.cp.metrics.records()
        assert sorted(records["request_id"]) == sorted(self.submitted)
        assert set(records["status"]) <= {"COMPLETED", "FAILED", "CANCELLED", "REJECTED"}


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
