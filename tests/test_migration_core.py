"""The core's side of a migration: what may move where (each refusal naming why), the slot
held on the target, the hand-over's accounting, and every way a move ends."""

from __future__ import annotations

import pytest

from cpsim import ControlPlane, ControlPlaneConfig, ExecutionInstance, RequestStatus
from policies import ROUTERS, SCHEDULING_POLICIES
from tests.test_core import req


def cluster(*extra: ExecutionInstance) -> ControlPlane:
    """x decoding on a (its first token out); b and what is given besides idle."""
    cp = ControlPlane(
        SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"](), config=ControlPlaneConfig()
    )
    cp.add_instance(ExecutionInstance("a", model_name="m", max_concurrent_requests=4), 0.0)
    cp.on_arrival(req("x", max_tokens=100, model_name="m"), 0.0)
    assert [d.instance_id for d in cp.dispatch(0.0)] == ["a"]
    for inst in (ExecutionInstance("b", model_name="m", max_concurrent_requests=1), *extra):
        cp.add_instance(inst, 0.0)
    cp.on_first_token("x", 0.1)
    return cp


@pytest.mark.parametrize(
    ("setup", "target", "problem"),
    [
        (lambda cp: None, "b", None),
        (lambda cp: None, "zz", "instance 'zz' is not registered"),
        (lambda cp: None, "a", "already on a"),
        (lambda cp: cp.set_instance_health("b", False), "b", "instance b is down or full"),
        (lambda cp: cp.drain_instance("b"), "b", "takes no new requests"),
        (lambda cp: cp.start_migration("x", "b", 0.2), "b", "already migrating to b"),
        (lambda cp: cp.on_finish("x", 0.2, 100), "b", "'x' is not running"),
        (lambda cp: None, "p", "instance p is prefilling; it does not decode"),
        (lambda cp: None, "other", "serves 'other-model', not 'm'"),
    ],
)
def test_what_may_migrate_where(setup, target: str, problem: str | None) -> None:  # type: ignore[no-untyped-def]
    cp = cluster(
        ExecutionInstance("p", model_name="m", instance_type="prefilling"),
        ExecutionInstance("other", model_name="other-model"),
    )
    setup(cp)
    found = cp.migration_problem("x", target)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found
        with pytest.raises(ValueError, match="cannot migrate"):
            cp.start_migration("x", target, 0.3)


def test_a_request_without_its_first_token_does_not_migrate() -> None:
    cp = ControlPlane(SCHEDULING_POLICIES["fifo"](), ROUTERS["round_robin"]())
    cp.add_instance(ExecutionInstance("a"), 0.0)
    cp.add_instance(ExecutionInstance("b"), 0.0)
    cp.on_arrival(req("x"), 0.0)
    cp.dispatch(0.0)
    assert "not decoding yet" in str(cp.migration_problem("x", "b"))


def test_the_target_holds_a_slot_until_the_hand_over_which_moves_the_request() -> None:
    cp = cluster()
    m = cp.start_migration("x", "b", 0.2)
    assert (m.request_id, m.source_instance_id, m.instance_id) == ("x", "a", "b")
    b = cp.instance_state("b")
    assert not b.has_capacity() and b.view().in_flight == 1  # its one slot is held
    assert cp.instance_state("a").view().in_flight == 1  # x still counts where it runs
    cp.on_tokens("x", 5, 0.3, instance_id="a")  # the source's events still count
    assert cp.end_migration("x", 30, 0.5, downtime_s=0.004)
    state = cp.request_state("x")
    assert state is not None and state.instance_id == "b" and state.num_output_tokens == 30
    assert cp.instance_state("a").view().in_flight == 0
    assert b.view().in_flight == 1 and b.incoming == set()
    cp.on_finish("x", 0.6, 5, instance_id="a")  # stale: the source no longer has it
    assert cp.status("x") is RequestStatus.RUNNING
    cp.on_finish("x", 2.0, 70, instance_id="b")  # the target's own 70 tokens
    row = cp.metrics.records().set_index("request_id").loc["x"]
    assert row["num_output_tokens"] == 100
    assert row["num_migrations"] == 1 and row["migration_downtime_s"] == pytest.approx(0.004)
    assert row["instance_id"] == "b"
    assert (cp.num_migrations, cp.num_migrations_cancelled) == (1, 0)


@pytest.mark.parametrize(
    ("end", "status", "cancelled"),
    [
        # x ends on its source while its KV is copied: the move is off, the slot let go
        (lambda cp: cp.on_finish("x", 0.3, 100, instance_id="a"), RequestStatus.COMPLETED, 1),
        # its source crashes: x fails (its tokens were streamed), the slot let go
        (lambda cp: cp.on_instance_failure("a", 0.3, "gone"), RequestStatus.FAILED, 1),
        # the target crashes: x stays where it runs
        (lambda cp: cp.on_instance_failure("b", 0.3, "gone"), RequestStatus.RUNNING, 1),
        (lambda cp: cp.remove_instance("b", 0.3), RequestStatus.RUNNING, 1),
        (lambda cp: cp.cancel("x", 0.3), RequestStatus.CANCELLED, 1),
    ],
)
def test_every_way_a_move_ends_lets_go_of_the_target_slot(end, status, cancelled) -> None:  # type: ignore[no-untyped-def]
    cp = cluster()
    cp.start_migration("x", "b", 0.2)
    end(cp)
    if status is RequestStatus.RUNNING:
        assert cp.status("x") is status
    else:
        assert cp.metrics.records().set_index("request_id").loc["x"]["status"] == status.name
    assert cp.migration_target("x") is None and cp.num_migrating == 0
    if "b" in [i.instance_id for i in cp.instances()]:
        assert cp.instance_state("b").incoming == set()
    assert cp.num_migrations_cancelled == cancelled
    assert not cp.end_migration("x", 10, 0.5)  # the driver's hand-over finds it off


def test_a_request_resumed_on_its_source_counts_from_where_it_stopped() -> None:
    cp = cluster()
    cp.start_migration("x", "b", 0.2)
    cp.on_instance_failure("b", 0.3, "gone")
    assert not cp.end_migration("x", 40, 0.4)
    cp.resume("x", 40)
    cp.on_finish("x", 1.0, 60, instance_id="a")
    assert cp.metrics.records().set_index("request_id").loc["x"]["num_output_tokens"] == 100
