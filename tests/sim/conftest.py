"""Shared pieces for the simulator tests: a linear latency model and a step driver."""

from __future__ import annotations

import pytest

from backends.sim.replica import ReplicaConfig, SimReplica
from backends.sim.step import StepOutcome
from cpsim.profiles import ProfiledLatencyModel

COEFFICIENTS = {
    "step_s": 0.010,
    "prefill_step_s": 0.002,
    "prefill_token_s": 1e-4,
    "prefill_token_sq_s": 1e-9,
    "prefill_context_token_s": 1e-6,
    "decode_seq_s": 2e-4,
    "decode_context_token_s": 1e-6,
}


@pytest.fixture
def latency() -> ProfiledLatencyModel:
    return ProfiledLatencyModel("test-model", "test-gpu", COEFFICIENTS)


def make_replica(latency, num_blocks=1000, **config) -> SimReplica:  # type: ignore[no-untyped-def]
    return SimReplica("r0", ReplicaConfig(**config), latency, num_blocks)


def drive(rep: SimReplica, fast: bool, max_iterations: int = 100_000):  # type: ignore[no-untyped-def]
    """Run the replica to empty. Returns {request_id: (first_token_s, finish_s, request)} and
    the clock; with ``fast`` pure decode runs go through advance_decode."""
    now = 0.0
    seen: dict[str, list] = {}  # type: ignore[type-arg]
    for _ in range(max_iterations):
        if not rep.has_work:
            break
        horizon = rep.decode_horizon() if fast else 0
        if horizon >= 2:
            now += float(rep.decode_run_times_s(horizon)[-1])
            outcome: StepOutcome = rep.advance_decode(horizon)
        else:
            plan = rep.schedule()
            now += rep.latency.step_time_s(plan.batch)
            outcome = rep.update_from_output(plan)
        rep.check()
        for rid in outcome.first_token_ids:
            seen.setdefault(rid, [None, None, None])[0] = now
        for req in outcome.finished:
            seen.setdefault(req.request_id, [None, None, None])[1:] = [now, req]
    return seen, now


class WithFrontend:
    """A latency model with frontend costs (cpsim.latency.frontend_costs_s); its decode runs
    priced in closed form (``closed_form``) or step by step."""

    def __init__(self, inner, request_s=0.0, stream_s=0.0, closed_form=True):  # type: ignore[no-untyped-def]
        self.inner, self.closed_form = inner, closed_form
        self.frontend_request_s, self.frontend_stream_s = request_s, stream_s

    def step_time_s(self, batch):  # type: ignore[no-untyped-def]
        return self.inner.step_time_s(batch)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        if not self.closed_form:
            raise AttributeError(name)
        return getattr(self.inner, name)
