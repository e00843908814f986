"""Live migration by recompute (backends/live_migration.py over the HTTP backend), against
stand-in engines (experiments/fake_engine) whose output is a counter: a request continued
elsewhere goes on exactly where it stopped only if the target got the prompt and the output
so far, so the client's text shows whether the splice was right."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from gateway_fixture import (  # noqa: E402
    FAKE_MODEL,
    fake_instances,
    run,
    running_fakes,
    running_gateway,
)

from backends.live_migration import LiveMigration  # noqa: E402
from backends.vllm.http import HTTPBackend  # noqa: E402
from cpsim.manager import ControlPlaneManager  # noqa: E402
from cpsim.types import ExecutionInstance, RequestMetadata, RequestStatus  # noqa: E402
from experiments.fake_engine import FIRST_OUTPUT_ID, FakeEngine  # noqa: E402
from policies.migration import KVBalancePolicy  # noqa: E402


def instances(ports: list[int]) -> list[ExecutionInstance]:
    return fake_instances(ports, max_model_len=4096)


def backend() -> HTTPBackend:
    return HTTPBackend(health_interval_s=0.1, scrape_interval_s=0.05)


async def made_tokens(manager: ControlPlaneManager, at_least: int) -> str:
    """The id of the one request in flight, once it has made ``at_least`` tokens."""
    for _ in range(500):
        for rid in manager.core.active_ids():
            state = manager.core.request_state(rid)
            if state is not None and state.num_output_tokens >= at_least:
                return str(rid)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no request made {at_least} tokens")


def other(instance_id: str) -> str:
    return "engine-1" if instance_id == "engine-0" else "engine-0"


def test_a_moved_stream_goes_on_where_it_stopped_and_its_client_sees_one_answer() -> None:
    async def main() -> None:
        async with running_fakes(2, token_delay_s=0.02) as fakes:
            ports = [f.port for f in fakes]
            async with running_gateway(instances(ports), backend=backend()) as (gw, url):
                manager = gw.manager
                mover = LiveMigration(manager, KVBalancePolicy())
                c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                async with c:
                    direct = await c.chat.completions.create(
                        model=FAKE_MODEL, messages=[{"role": "user", "content": "hello"}],
                        max_tokens=3)  # fmt: skip
                    stream = await c.chat.completions.create(
                        model=FAKE_MODEL, messages=[{"role": "user", "content": "hello"}],
                        max_tokens=30, temperature=0.5, stream=True,
                        stream_options={"include_usage": True},
                    )  # fmt: skip

                    async def read() -> list[Any]:
                        return [ch async for ch in stream]

                    reading = asyncio.create_task(read())
                    rid = await made_tokens(manager, 8)
                    source = manager.core.request_state(rid).instance_id
                    assert mover.move(rid, other(source)), mover.last_refusal
                    chunks = await reading
                    records = manager.get_request_records().set_index("request_id")
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text == "".join(f" t{k}" for k in range(30))  # nothing lost or repeated
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
            assert finish[-1] == "length" and finish.count("length") == 1
            assert chunks[-1].usage.completion_tokens == 30
            assert chunks[-1].usage.prompt_tokens == direct.usage.prompt_tokens
            assert {ch.object for ch in chunks} == {"chat.completion.chunk"}
            # the target was asked for the rest, with prompt and output so far as its prompt
            target = fakes[int(other(source)[-1])].engine
            sent = target.requests[-1]
            made = 30 - sent["max_tokens"]
            assert 8 <= made < 30 and "messages" not in sent
            assert sent["prompt"][-made:] == [FIRST_OUTPUT_ID + k for k in range(made)]
            assert sent["temperature"] == 0.5 and sent["model"] == FAKE_MODEL
            row = records.loc[rid]
            assert row["status"] == "COMPLETED" and row["instance_id"] == other(source)
            assert row["num_output_tokens"] == 30 == row["usage_completion_tokens"]
            assert row["num_migrations"] == 1 and 0 <= row["migration_pause_s"] < 1.0
            assert all(f.engine.running == 0 for f in fakes)  # the source's stream was closed

    run(main())


def test_completions_continue_and_a_body_that_cannot_be_continued_stays() -> None:
    async def main() -> None:
        async with running_fakes(2, token_delay_s=0.02) as fakes:
            async with running_gateway(instances([f.port for f in fakes]), backend=backend()) as (
                gw,
                url,
            ):
                manager = gw.manager
                mover = LiveMigration(manager, KVBalancePolicy())
                c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                async with c:
                    prompt = "a prompt of some words"
                    whole = asyncio.create_task(c.completions.create(
                        model=FAKE_MODEL, prompt=prompt, max_tokens=25))  # fmt: skip
                    rid = await made_tokens(manager, 5)
                    source = manager.core.request_state(rid).instance_id
                    assert mover.move(rid, other(source)), mover.last_refusal
                    done = await whole
                    assert done.choices[0].text == "".join(f" t{k}" for k in range(25))
                    assert done.usage.completion_tokens == 25
                    assert done.usage.prompt_tokens == len(prompt) // 4

                    kept = asyncio.create_task(c.completions.create(
                        model=FAKE_MODEL, prompt="another", max_tokens=25, logprobs=1))  # fmt: skip
                    rid = await made_tokens(manager, 5)
                    source = manager.core.request_state(rid).instance_id
                    assert not mover.move(rid, other(source))
                    assert "logprobs" in (mover.last_refusal or "")
                    assert manager.core.migration_target(rid) is None  # no slot left held
                    assert (await kept).usage.completion_tokens == 25
                    records = manager.get_request_records().set_index("request_id")
            assert records.loc[rid, "instance_id"] == source
            assert mover.num_moved == 1 and mover.num_refused == 1

    run(main())


def test_a_target_that_fails_fails_the_moved_request_with_a_reason() -> None:
    async def main() -> None:
        async with running_fakes(2, token_delay_s=0.02) as fakes:
            manager = ControlPlaneManager(backend=backend(), enable_monitoring=False)
            for inst in instances([f.port for f in fakes]):
                manager.register_instance(inst)
            await manager.start()
            try:
                mover = LiveMigration(manager, KVBalancePolicy())
                rid = await manager.submit_request(
                    RequestMetadata("r", num_prompt_tokens=40, max_tokens=40))  # fmt: skip
                await made_tokens(manager, 5)
                target = other(manager.core.request_state(rid).instance_id)
                fakes[int(target[-1])].engine.fail_all = True
                assert mover.move(rid, target)
                status = await manager.wait_for_request(rid, timeout_s=10)
                reason = manager.get_request_reason(rid) or ""
            finally:
                await manager.stop()
        # its tokens were streamed: it cannot start over elsewhere, so it fails, once
        assert status is RequestStatus.FAILED and "500" in reason and target in reason

    run(main())


def test_kv_balance_moves_decodes_to_a_new_engine_and_every_request_completes() -> None:
    """Six long requests fill engine-0's KV cache (a fake of 100 blocks); engine-1 joins
    empty; the policy moves decodes to it, and each request still makes all its tokens."""

    async def main() -> tuple[Any, LiveMigration, list[FakeEngine]]:
        async with running_fakes(2, token_delay_s=0.01, num_blocks=100) as fakes:
            first, second = instances([f.port for f in fakes])
            manager = ControlPlaneManager(backend=backend(), enable_monitoring=False)
            manager.register_instance(first)
            await manager.start()
            policy = KVBalancePolicy(high_usage=0.6, low_usage=0.3, min_remaining_tokens=8,
                                     interval_s=0.1)  # fmt: skip
            mover = LiveMigration(manager, policy)
            await mover.start()
            try:
                ids = [
                    await manager.submit_request(
                        RequestMetadata(f"r{i}", num_prompt_tokens=200, max_tokens=120))
                    for i in range(6)
                ]  # fmt: skip
                await made_tokens(manager, 10)
                manager.register_instance(second)
                statuses = [await manager.wait_for_request(r, timeout_s=30) for r in ids]
                records = manager.get_request_records()
            finally:
                await mover.stop()
                await manager.stop()
        assert statuses == [RequestStatus.COMPLETED] * 6
        return records, mover, [f.engine for f in fakes]

    records, mover, fakes = run(main())
    assert (records["num_output_tokens"] == 120).all()
    assert (records["usage_completion_tokens"] == 120).all()
    moved = records[records["num_migrations"] >= 1]
    assert mover.num_moved >= 2 and len(moved) >= 2
    assert set(moved["instance_id"]) == {"engine-1"}
    for body in fakes[1].requests:  # each continuation: 200 prompt tokens, then its output
        made = len(body["prompt"]) - 200
        assert body["prompt"][200:] == [FIRST_OUTPUT_ID + k for k in range(made)]
        assert body["max_tokens"] == 120 - made


def test_a_backend_that_cannot_move_requests_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'sim' cannot move running requests"):
        LiveMigration(ControlPlaneManager(enable_monitoring=False), KVBalancePolicy())


@pytest.mark.parametrize(
    ("num_blocks", "kv_usage", "shares"),
    [
        (100, None, [7 / 100, 20 / 100]),  # blocks of 16 tokens over the engine's cache
        (None, 0.5, [0.5 * 110 / 420, 0.5 * 310 / 420]),  # its usage, shared by context
        (None, None, None),  # nothing known yet: left out
    ],
)
def test_decoding_views_price_each_request_s_share_of_its_engine_s_kv_cache(
    num_blocks: int | None, kv_usage: float | None, shares: list[float] | None
) -> None:
    from backends.vllm.http import _Flight, _Server
    from backends.vllm.metrics_scrape import MetricsScraper
    from cpsim.core import Dispatch
    from cpsim.views import Phase

    http = backend()
    scraped = MetricsScraper("a", kv_usage_frac=kv_usage, num_blocks=num_blocks)
    server = _Server("a", "http://127.0.0.1:1", scraped, 32000)
    http._servers["a"] = server
    for rid, prompt in (("short", 100), ("long", 300)):
        meta = RequestMetadata(rid, num_prompt_tokens=prompt, max_tokens=50)
        flight = _Flight(Dispatch(meta, "a", Phase.FULL), prompt_ids=[1] * prompt, num_made=10)
        http._flights[rid] = flight
        server.tasks[rid] = None  # type: ignore[assignment]  # streaming: only the key counts
    views = http.decoding()
    if shares is None:
        assert views == {}
        return
    assert [(v.request_id, v.num_context_tokens, v.num_remaining_tokens) for v in views["a"]] == [
        ("short", 110, 40),
        ("long", 310, 40),
    ]
    assert [v.kv_frac for v in views["a"]] == pytest.approx(shares)
