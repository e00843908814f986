"""The gateway over the HTTP backend, in front of stand-in engines (experiments/fake_engine):
the client's body reaches the engine, the engine's answer reaches the client, engine errors
come back as errors, and an engine that dies or fails everything loses no request."""

from __future__ import annotations

import asyncio

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("aiohttp")

from gateway_fixture import (  # noqa: E402
    FAKE_MODEL,
    fake_instances,
    run,
    running_fakes,
    running_gateway,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from backends.vllm.http import HTTPBackend  # noqa: E402


def backend() -> HTTPBackend:
    return HTTPBackend(health_interval_s=0.1, unhealthy_after=2, scrape_interval_s=0.2)


def counts(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "cpsim:requests_total":
                out[(s.labels["status"], s.labels["reason"])] = s.value
    return out


def test_the_clients_body_goes_to_the_engine_and_its_answer_comes_back() -> None:
    async def main() -> None:
        async with running_fakes(1) as fakes:
            engine = fakes[0].engine
            async with running_gateway(fake_instances([fakes[0].port]), backend=backend()) as (
                _gw, url
            ):
                c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                async with c:
                    stream = await c.chat.completions.create(
                        model=FAKE_MODEL, messages=[{"role": "user", "content": "hello"}],
                        max_tokens=4, temperature=0.5, stream=True,
                        stream_options={"include_usage": True},
                        extra_body={"priority": "high", "top_k": 5},
                    )
                    chunks = [ch async for ch in stream]
                    text = "".join(ch.choices[0].delta.content or "" for ch in chunks
                                   if ch.choices)
                    assert text == " t0 t1 t2 t3"
                    assert chunks[-1].usage.completion_tokens == 4
                    assert not hasattr(chunks[0].choices[0], "token_ids") or (
                        chunks[0].choices[0].token_ids is None)  # not asked for
                    sent = engine.requests[-1]
                    assert sent["messages"] == [{"role": "user", "content": "hello"}]
                    assert sent["temperature"] == 0.5 and sent["top_k"] == 5
                    assert "priority" not in sent  # cpsim's, not the engine's
                    done = await c.completions.create(model=FAKE_MODEL, prompt="hi", max_tokens=3)
                    assert done.choices[0].text == " t0 t1 t2"
                    assert done.choices[0].finish_reason == "length"
                    assert done.usage.completion_tokens == 3
                    # the engine's own refusal comes back with its status and message
                    with pytest.raises(openai.BadRequestError, match="temperature"):
                        await c.completions.create(model=FAKE_MODEL, prompt="hi", temperature=5)

    run(main())


def test_an_engine_that_dies_mid_run_loses_no_request() -> None:
    async def main() -> None:
        async with running_fakes(2, token_delay_s=0.01) as fakes:
            ports = [f.port for f in fakes]
            async with running_gateway(fake_instances(ports), backend=backend()) as (gw, url):
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:

                    async def one(i: int) -> int:
                        body = {"model": FAKE_MODEL, "prompt": f"p{i}", "max_tokens": 50}
                        return (await http.post("/v1/completions", json=body)).status_code

                    first = [asyncio.create_task(one(i)) for i in range(20)]
                    await asyncio.sleep(0.2)
                    fakes[0].server.should_exit = True  # engine-0 goes away mid-stream
                    fakes[0].server.force_exit = True
                    await fakes[0].task
                    codes = await asyncio.gather(*first)
                    for _ in range(100):
                        if not gw.manager.get_instance_metrics("engine-0")["is_healthy"]:
                            break
                        await asyncio.sleep(0.05)
                    assert not gw.manager.get_instance_metrics("engine-0")["is_healthy"]
                    after = await asyncio.gather(*(one(100 + i) for i in range(10)))
                assert after == [200] * 10  # all on engine-1
                records = gw.manager.get_request_records()
                assert len(records) == 30 and records["request_id"].is_unique
                assert set(records.tail(10)["instance_id"]) == {"engine-1"}
                # what was mid-stream on engine-0 ended FAILED with a reason; no request is
                # still running, and each counts once in /metrics
                statuses = records["status"].astype(str).value_counts().to_dict()
                assert statuses.get("COMPLETED", 0) == codes.count(200) + 10
                assert statuses.get("FAILED", 0) == codes.count(502)
                assert codes.count(200) + codes.count(502) == 20
                assert gw.manager.core.num_active == 0
                text = (await httpx.AsyncClient().get(f"{url}/metrics")).text
                assert sum(counts(text).values()) == 30

    run(main())


def test_an_engine_that_fails_every_request_does_not_capture_the_traffic() -> None:
    async def main() -> None:
        async with running_fakes(2) as fakes:
            fakes[0].engine.fail_all = True
            gateway = running_gateway(fake_instances([f.port for f in fakes]), backend=backend())
            async with gateway as (_gw, url):
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    codes = []
                    for wave in range(10):
                        codes += await asyncio.gather(*(
                            http.post("/v1/completions", json={
                                "model": FAKE_MODEL, "prompt": f"{wave}-{i}", "max_tokens": 3})
                            for i in range(4)
                        ))
                    assert [r.status_code for r in codes] == [200] * 40
                    text = (await http.get("/metrics")).text
                assert counts(text) == {("COMPLETED", "finished"): 40.0}
                assert len(fakes[0].engine.requests) <= 10  # a few tries, then it is avoided

    run(main())


def test_a_client_that_disconnects_has_its_engine_stream_closed() -> None:
    async def main() -> None:
        async with running_fakes(1, token_delay_s=0.01) as fakes:
            engine = fakes[0].engine
            gateway = running_gateway(fake_instances([fakes[0].port]), backend=backend())
            async with gateway as (gw, url):
                body = {"model": FAKE_MODEL, "prompt": "a", "max_tokens": 2000, "stream": True}
                async with (
                    httpx.AsyncClient(base_url=url, timeout=30) as http,
                    http.stream("POST", "/v1/completions", json=body) as resp,
                ):
                    seen, streaming = 0, 0
                    async for line in resp.aiter_lines():
                        seen += line.startswith("data:")
                        if seen == 3:
                            streaming = engine.running
                            break
                assert streaming == 1  # the engine was mid-stream when the client left
                for _ in range(200):  # the gateway cancels, the HTTP backend hangs up
                    if engine.running == 0 and gw.manager.core.num_active == 0:
                        break
                    await asyncio.sleep(0.02)
                assert engine.running == 0 and gw.manager.core.num_active == 0
                records = gw.manager.get_request_records()
                assert [str(s) for s in records["status"]] == ["CANCELLED"]
                assert records["num_output_tokens"].iloc[0] < 2000

    run(main())
