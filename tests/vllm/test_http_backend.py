"""The manager over two real vLLM OpenAI servers (backends/vllm/http.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from typing import Any

import pytest

from backends.vllm.http import HTTPBackend
from backends.vllm.metrics_scrape import RUNNING, metric_sum, parse_prometheus_text
from cpsim.manager import ControlPlaneManager
from cpsim.types import ExecutionInstance, RequestMetadata, RequestStatus
from cpsim.views import InstanceSnapshot

pytestmark = pytest.mark.vllm


class EventRecorder:
    """Passes every engine event on to the manager's sink, keeping snapshots and instance
    events for the test to read."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.snapshots: list[InstanceSnapshot] = []
        self.instance_events: list[tuple[str, str]] = []
        self.failure_reasons: list[tuple[str, str]] = []  # (instance id, reason) per failure
        self.after_token_event: Any = None  # called after each first-token or tokens event

    def on_first_token(self, request_id: str, instance_id: str, now: float) -> None:
        self.sink.on_first_token(request_id, instance_id, now)
        if self.after_token_event is not None:
            self.after_token_event()

    def on_tokens(self, request_id: str, instance_id: str, num_tokens: int, now: float) -> None:
        self.sink.on_tokens(request_id, instance_id, num_tokens, now)
        if self.after_token_event is not None:
            self.after_token_event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def on_snapshot(self, snapshot: InstanceSnapshot, now: float) -> None:
        self.snapshots.append(snapshot)
        self.sink.on_snapshot(snapshot, now)

    def on_instance_failure(self, instance_id: str, reason: str, now: float) -> None:
        self.instance_events.append(("failed", instance_id))
        self.failure_reasons.append((instance_id, reason))
        self.sink.on_instance_failure(instance_id, reason, now)

    def on_instance_recovered(self, instance_id: str, now: float) -> None:
        self.instance_events.append(("recovered", instance_id))
        self.sink.on_instance_recovered(instance_id, now)


def _instances(engines: list[Any], **changes: Any) -> list[ExecutionInstance]:
    out = []
    for e in engines:
        i = e.instance
        out.append(
            ExecutionInstance(
                i.instance_id,
                host=i.host,
                port=i.port,
                model_name=i.model_name,
                max_concurrent_requests=64,
                **changes,
            )
        )
    return out


def _server_running(engine: Any) -> float:
    with urllib.request.urlopen(f"{engine.instance.endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    value = metric_sum(parse_prometheus_text(text), RUNNING)
    assert value is not None, "vllm:num_requests_running missing from /metrics"
    return value


def _num_streaming(
    cp: ControlPlaneManager, metas: list[RequestMetadata], on: str | None = None
) -> int:
    """Requests of ``metas`` past their first token and not ended (on instance ``on``)."""
    states = [cp.core.request_state(m.request_id) for m in metas]
    return sum(
        1
        for s in states
        if s is not None and s.first_token_s is not None and on in (None, s.instance_id)
    )


def _manager(**backend_kwargs: Any) -> tuple[ControlPlaneManager, HTTPBackend, EventRecorder]:
    backend = HTTPBackend(scrape_interval_s=0.2, health_interval_s=0.5, **backend_kwargs)
    cp = ControlPlaneManager(
        routing_strategy="load_balanced", backend=backend, enable_monitoring=False
    )
    recorder = cp.events = EventRecorder(cp.events)  # the sink the backend is started with
    return cp, backend, recorder


def test_streams_count_tokens_exactly_and_metrics_become_snapshots(
    http_engines: list[Any],
) -> None:
    async def main() -> tuple:
        cp, _, recorder = _manager()
        await cp.start()
        for inst in _instances(http_engines):
            cp.register_instance(inst)
        await cp.wait_for_instances()  # each passed its first health check in the background
        ids = []
        for i in range(12):
            meta = RequestMetadata(f"lb-{i}", num_prompt_tokens=30 + 50 * i, max_tokens=5 + 7 * i)
            ids.append(await cp.submit_request(meta))
        statuses = [await cp.wait_for_request(r, timeout_s=90) for r in ids]
        await asyncio.sleep(0.5)
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        return statuses, records, recorder.snapshots

    statuses, records, snapshots = asyncio.run(main())
    assert statuses == [RequestStatus.COMPLETED] * 12
    for i in range(12):
        row = records.loc[f"lb-{i}"]
        assert row["num_output_tokens"] == 5 + 7 * i == row["usage_completion_tokens"]
        assert row["ttft_ms"] > 0 and row["latency_ms"] >= row["ttft_ms"]
    assert set(records["instance_id"]) == {e.instance.instance_id for e in http_engines}
    seen = {s.instance_id for s in snapshots}
    assert seen == {e.instance.instance_id for e in http_engines}
    assert all(s.num_running is not None and s.kv_cache_usage_frac is not None for s in snapshots)
    assert all(s.is_healthy is None for s in snapshots)  # health is the health checks' job
    assert any(s.prefix_cache_hit_rate is not None for s in snapshots)


def test_cancel_closes_the_stream_and_the_server_aborts(http_engines: list[Any]) -> None:
    engine = http_engines[0]

    async def main() -> tuple:
        cp, backend, _ = _manager()
        cp.register_instance(_instances([engine])[0])
        await cp.start()
        await cp.submit_request(RequestMetadata("long", num_prompt_tokens=80, max_tokens=1900))
        iid = engine.instance.instance_id
        while cp.core.request_state("long").first_token_s is None:
            await asyncio.sleep(0.02)
        running_before = await asyncio.to_thread(_server_running, engine)
        assert await cp.cancel_request("long")
        t0 = time.monotonic()
        running_after = running_before
        while time.monotonic() - t0 < 5 and running_after > 0:
            await asyncio.sleep(0.05)
            running_after = await asyncio.to_thread(_server_running, engine)
        status = await cp.get_request_status("long")
        in_flight = backend.in_flight(iid)
        await cp.stop()
        return running_before, running_after, time.monotonic() - t0, status, in_flight

    before, after, took_s, status, in_flight = asyncio.run(main())
    assert before == 1 and after == 0 and took_s < 5
    assert status is RequestStatus.CANCELLED and in_flight == 0


def test_a_frozen_server_is_marked_unhealthy_and_recovers(http_engines: list[Any]) -> None:
    """SIGSTOP the API server (its engine lives on): /health stops answering, the instance
    fails after ``unhealthy_after`` probes; SIGCONT: the next good probe recovers it."""
    engine = http_engines[0]
    iid = engine.instance.instance_id

    async def main() -> tuple:
        cp, backend, recorder = _manager(health_timeout_s=0.5, unhealthy_after=2)
        backend.health_interval_s = 0.2
        cp.register_instance(_instances([engine])[0])
        await cp.start()
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            while backend.is_healthy(iid):
                await asyncio.sleep(0.05)
            down = cp.get_instance_metrics(iid)["is_healthy"]
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        while not backend.is_healthy(iid):
            await asyncio.sleep(0.05)
        up = cp.get_instance_metrics(iid)["is_healthy"]
        await cp.submit_request(RequestMetadata("after", num_prompt_tokens=10, max_tokens=3))
        status = await cp.wait_for_request("after", timeout_s=30)
        await cp.stop()
        return down, up, status, recorder.instance_events

    down, up, status, events = asyncio.run(main())
    assert (down, up) == (False, True)
    assert events == [("failed", iid), ("recovered", iid)]
    assert status is RequestStatus.COMPLETED


@pytest.mark.kills_engine
def test_killed_engine_is_marked_unhealthy_and_no_request_is_lost(
    http_engines: list[Any],
) -> None:
    """SIGKILL one server's process group mid-run: every request ends in exactly one state
    (completed, retried on the other engine, or failed with a reason naming the dead one)."""
    victim, survivor = http_engines[1], http_engines[0]
    dead, alive = victim.instance.instance_id, survivor.instance.instance_id

    async def main() -> tuple:
        # the dead engine refuses connections at once; the survivor, taking every request on
        # a loaded 2-core CI box, once answered /health slower than the default 2 s twice
        cp, backend, recorder = _manager(unhealthy_after=2, health_timeout_s=10.0)
        await cp.start()
        for inst in _instances(http_engines):
            cp.register_instance(inst)
        await cp.wait_for_instances()  # each passed its first health check in the background
        first = [
            RequestMetadata(f"fo-{i}", num_prompt_tokens=64, max_tokens=1200) for i in range(9)
        ]
        killed: list[bool] = []
        most_streaming = [0]

        def kill_when_three_stream_on_the_victim() -> None:
            # checked at every token event, not by polling: a loaded box may read a whole
            # stream between two polls, and then no poll would see it streaming. Only the
            # victim's count matters: CI's other engine once started its requests only as
            # the victim's ended, 5.7 s later
            streaming = _num_streaming(cp, first, on=dead)
            most_streaming[0] = max(most_streaming[0], streaming)
            if streaming >= 3 and not killed:
                victim.kill(signal.SIGKILL)
                killed.append(True)

        recorder.after_token_event = kill_when_three_stream_on_the_victim
        for meta in first:
            await cp.submit_request(meta)
        deadline = asyncio.get_running_loop().time() + 60.0
        while not killed:  # bounded: a hang here would stall the suite
            if asyncio.get_running_loop().time() > deadline:
                times = ["arrival_time_s", "ttft_ms", "latency_ms"]
                ended = cp.get_request_records()[["request_id", "instance_id", *times]]
                raise AssertionError(
                    f"at most {most_streaming[0]} requests streamed at once on {dead} in 60 s; "
                    f"ended: {ended.to_dict('records')}"
                )
            await asyncio.sleep(0.02)
        late = [RequestMetadata(f"late-{i}", num_prompt_tokens=40, max_tokens=20) for i in range(6)]
        for meta in late:  # some may still be routed to the dead engine: they must retry
            await cp.submit_request(meta)
        await cp.drain(timeout_s=120)
        healthy = cp.get_instance_metrics(dead)["is_healthy"], backend.is_healthy(dead)
        records = cp.get_request_records().set_index("request_id")
        await cp.stop()
        return records, healthy, recorder.instance_events, recorder.failure_reasons

    # bounded as a whole: a stuck await fails the test instead of stalling CI
    records, healthy, instance_events, reasons = asyncio.run(asyncio.wait_for(main(), 300.0))
    assert healthy == (False, False)
    assert ("failed", dead) in instance_events, reasons
    assert ("failed", alive) not in instance_events, reasons
    assert len(records) == 15  # nothing lost, nothing doubled
    for rid, row in records.iterrows():
        if row["status"] == "COMPLETED":
            # on the survivor, or on the victim when the victim sent the whole stream before
            # it died: a fast engine streams 1200 tokens in about a second, and a loaded client
            # may read the last of them (and the server's usage) after the kill
            assert row["num_output_tokens"] in (1200, 20), rid
            assert row["usage_completion_tokens"] == row["num_output_tokens"], rid
        else:
            assert row["status"] == "FAILED", rid
            assert dead in row["reason"], (rid, row["reason"])
    late = records.loc[[f"late-{i}" for i in range(6)]]
    assert (late["status"] == "COMPLETED").all()  # no token yet: retried on the survivor
    assert (records["status"] == "COMPLETED").sum() >= 6  # the survivor's own requests
    assert victim.wait_gone(timeout_s=30) == []  # SIGKILLed processes take a moment to exit


def test_a_stream_moved_by_recompute_goes_on_as_it_would_have(http_engines: list[Any]) -> None:
    """A greedy completion, once run where it started and once moved to the other engine
    after 12 tokens (backends/live_migration.py): the moved one's client gets the same
    token ids, the target was sent prompt and output so far, and the source aborted it.
    (1000 tokens, some 7 s of decoding here: an API server short of CPU sends tokens in
    bursts, and the move must come before the last; at 200 tokens one CI run's first burst
    after the twelfth token was the last.)"""
    from backends.live_migration import LiveMigration
    from cpsim.streams import ClientStream
    from policies.migration import KVBalancePolicy

    n_tokens = 1000
    prompt = [(7 * i) % 900 + 100 for i in range(300)]
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}  # fmt: skip

    async def main() -> tuple:
        cp, backend, recorder = _manager()
        for inst in _instances(http_engines):
            cp.register_instance(inst)
        await cp.start()
        mover = LiveMigration(cp, KVBalancePolicy())
        chunks: dict[str, list[dict[str, Any]]] = {"still": [], "moved": []}
        moves: list[tuple[str, str, bool, str | None]] = []

        def move_after_12() -> None:
            # from inside the token event: a burst of tokens cannot end the request first
            state = cp.core.request_state("moved")
            if moves or state is None or state.num_output_tokens < 12:
                return
            source = str(state.instance_id)
            target = next(i.instance_id for i in cp.get_instances() if i.instance_id != source)
            moves.append((source, target, mover.move("moved", target), mover.last_refusal))

        for rid in chunks:
            backend.client_streams[rid] = ClientStream(
                "completions", dict(body), chunks[rid].append
            )
            recorder.after_token_event = move_after_12 if rid == "moved" else None
            request = RequestMetadata(rid, prompt_token_ids=prompt, max_tokens=n_tokens)
            await cp.submit_request(request)
            assert await cp.wait_for_request(rid, timeout_s=60) is RequestStatus.COMPLETED
        records = cp.get_request_records().set_index("request_id")
        running = [await asyncio.to_thread(_server_running, e) for e in http_engines]
        await cp.stop()
        return chunks, records, moves, running

    chunks, records, moves, running = asyncio.run(main())
    ids = {rid: [t for ch in cs for c in ch["choices"] for t in c.get("token_ids") or ()]
           for rid, cs in chunks.items()}  # fmt: skip
    ((source, target, moved, refusal),) = moves
    assert moved, refusal
    assert len(ids["still"]) == len(ids["moved"]) == n_tokens
    assert ids["moved"] == ids["still"]  # greedy: the continuation picks the same tokens
    usage = [ch["usage"] for ch in chunks["moved"] if ch.get("usage")][-1]
    assert usage["prompt_tokens"] == 300 and usage["completion_tokens"] == n_tokens
    row = records.loc["moved"]
    assert row["num_migrations"] == 1 and row["instance_id"] == target != source
    assert row["num_output_tokens"] == n_tokens == row["usage_completion_tokens"]
    assert 0 < row["migration_pause_s"] < 2.0
    assert running == [0, 0]  # the source aborted the stream it lost
