"""A PD hand-off ends, whatever fails on its way, and no replica keeps its KV: a table of the
fault points (prefill instance, decode target before, during and after the transfer, after
the first token, no decode instance up, none taking it in time), each run in the simulator."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from backends.sim.cluster import KVLink
from backends.sim.faults import Fault
from cpsim.core import ControlPlaneConfig
from cpsim.latency import StepBatch
from policies.pd.threshold import ThresholdPDPolicy
from tests.sim.test_cluster import LATENCY, MODEL, SLOW_LINK, req, simulate, spec

PREFILL_S = LATENCY.step_time_s(StepBatch(1000, 1000 * 1000, 0, 1))
FAST_LINK = KVLink()
SLOW_TRANSFER_S = SLOW_LINK.transfer_s(1000 * MODEL.kv_bytes_per_token())
FAST_TRANSFER_S = FAST_LINK.transfer_s(1000 * MODEL.kv_bytes_per_token())


@dataclass
class Case:
    faults: dict[str, list[Fault]]  # by instance: p (prefilling), d1 and d2 (decoding)
    status: str
    where: tuple[str, str] | None  # (prefill, decode) instance of the completed try
    decode_instances: tuple[str, ...] = ("d1", "d2")
    link: KVLink = FAST_LINK
    queue_timeout_s: float = 10.0
    reason: str = ""
    hog: bool = False  # a long request fills d1 first (one slot)
    instance: str | None = None  # where the completed try ran, when it ran whole


CASES = {
    # the prefill instance dies mid-prefill: no prefill instance is left, so the request runs
    # whole on a decode instance
    "prefill dies mid-prefill": Case({"p": [Fault("crash", PREFILL_S / 2)]}, "COMPLETED", None),
    # the decode target is down before the hand-off: the other one takes it
    "decode target down before the hand-off": Case(
        {"d1": [Fault("crash", 0.0)]}, "COMPLETED", ("p", "d2")
    ),
    # it dies while the KV travels: prefilled again, handed to the other
    "decode target dies during the transfer": Case(
        {"d1": [Fault("crash", PREFILL_S + SLOW_TRANSFER_S / 2)]}, "COMPLETED", ("p", "d2"),
        link=SLOW_LINK,
    ),
    # it dies after the KV arrived, before its first token: no token reached the client
    "decode target dies after the transfer": Case(
        {"d1": [Fault("crash", PREFILL_S + SLOW_TRANSFER_S + 0.002)]}, "COMPLETED",
        ("p", "d2"), link=SLOW_LINK,
    ),
    # it dies after tokens were streamed: they cannot be taken back
    "decode target dies after its first token": Case(
        {"d1": [Fault("crash", PREFILL_S + FAST_TRANSFER_S + 0.05)]}, "FAILED", None,
        reason="d1",
    ),
    # the link breaks while the KV travels to d1: prefilled again, handed to d2, whose link
    # works
    "the link to the decode target fails during the transfer": Case(
        {"d1": [Fault("link", PREFILL_S + SLOW_TRANSFER_S / 2)]}, "COMPLETED", ("p", "d2"),
        link=SLOW_LINK,
    ),
    # the prefill instance's link is down for good: every hand-off breaks, and after the
    # last attempt the request fails, saying so
    "the prefill instance's link is down": Case(
        {"p": [Fault("link", 0.0)]}, "FAILED", None,
        reason="failed: the link of p is down",
    ),
    # the only decode instance dies during the prefill: decoded where it was prefilled,
    # the KV already there
    "no decode instance up at the hand-off": Case(
        {"d1": [Fault("crash", PREFILL_S / 2)]}, "COMPLETED", ("p", "p"),
        decode_instances=("d1",),
    ),
    # none is up as it arrives: the prefill instance runs it whole (it can decode)
    "no decode instance up at arrival": Case(
        {"d1": [Fault("crash", 0.0)]}, "COMPLETED", None, decode_instances=("d1",),
        queue_timeout_s=1.0, instance="p",
    ),
    # none is up, and the prefill instance is down too: it waits, and fails at the timeout
    "no instance up at arrival": Case(
        {"p": [Fault("crash", 0.0)], "d1": [Fault("crash", 0.0)]}, "FAILED", None,
        decode_instances=("d1",), queue_timeout_s=1.0, reason="queued longer than 1.0 s",
    ),
    # the only decode instance is up but full beyond the queue timeout
    "no decode instance takes it in time": Case(
        {}, "FAILED", None, decode_instances=("d1",), hog=True, queue_timeout_s=1.0,
        reason="prefilled on p, but no decode instance took it within 1.0 s",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_handoff_ends_whatever_fails_and_no_replica_keeps_its_kv(name: str) -> None:
    case = CASES[name]
    specs = [spec("p", instance_type="prefilling", faults=case.faults.get("p", []))]
    for iid in case.decode_instances:
        slots = 1 if case.hog and iid == "d1" else 64
        specs.append(spec(iid, instance_type="decoding", max_concurrent_requests=slots,
                          faults=case.faults.get(iid, [])))
    requests = [(0.0, req("x", 1000, 20))]
    if case.hog:
        requests.insert(0, (0.0, req("hog", 100, 5000)))
    result, cluster = simulate(
        specs, requests, pd_policy=ThresholdPDPolicy(800), kv_link=case.link,
        core=ControlPlaneConfig(queue_timeout_s=case.queue_timeout_s), drain_timeout_s=120.0,
    )
    df = result.requests.set_index("request_id")
    assert sorted(df.index) == sorted(r.request_id for _, r in requests)  # each ended once
    row = df.loc["x"]
    assert row["status"] == case.status, row["reason"]
    if case.where is not None:
        assert (row["prefill_instance_id"], row["decode_instance_id"]) == case.where
    if case.instance is not None:
        assert row["instance_id"] == case.instance
    if case.status == "COMPLETED":
        assert row["num_output_tokens"] == 20
    assert case.reason in str(row["reason"] or "")
    # nothing held: every replica has let go of every request and its KV blocks
    for proc in cluster.procs.values():
        snap = proc.snapshot()
        assert snap.num_running == snap.num_waiting == 0
        assert snap.kv_cache_usage_frac == 0.0
