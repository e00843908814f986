"""The OpenAI gateway over simulated replicas: the API as OpenAI clients use it, errors,
auth, limits, disconnects, failures, metrics and the admin API (no engine needed)."""

from __future__ import annotations

import asyncio
import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gateway_fixture import MODEL, run, running_gateway, sim_instances  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from backends.sim.faults import Fault  # noqa: E402
from cpsim.core import ControlPlaneConfig  # noqa: E402
from cpsim.types import RequestStatus  # noqa: E402


def client(url: str, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric ``name`` (a counter's ``_total``), by their labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def metrics_text(url: str) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{url}/metrics")).text


def test_completion_and_chat_answer_as_openai_clients_expect() -> None:
    async def main() -> None:
        async with running_gateway() as (_gw, url), client(url) as c:
            done = await c.completions.create(model=MODEL, prompt="Hello there", max_tokens=7)
            assert done.choices[0].finish_reason == "length"
            assert done.usage.completion_tokens == 7
            assert len(done.choices[0].text.split()) == 7
            assert done.usage.prompt_tokens >= 1

            chat = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert chat.choices[0].message.role == "assistant"
            assert len(chat.choices[0].message.content.split()) == 4
            assert chat.usage.completion_tokens == 4

            stream = await c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "stream please"}],
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert len(text.split()) == 5
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
            assert len({ch.id for ch in chunks}) == 1

            plain = await c.completions.create(
                model=MODEL, prompt=[1, 2, 3], max_tokens=3, stream=True
            )
            parts = [chunk async for chunk in plain]
            assert all(p.usage is None for p in parts)  # not asked for
            assert "".join(p.choices[0].text for p in parts).split() == [
                "the", "control", "plane"
            ]

            models = await c.models.list()
            assert [m.id for m in models.data] == [MODEL]

    run(main())


def test_bad_requests_get_openai_errors_that_name_the_field() -> None:
    async def main() -> None:
        async with running_gateway(max_model_len={MODEL: 2048}) as (_gw, url):
            async with httpx.AsyncClient(base_url=url) as http:
                cases = [
                    ("/v1/completions", b"{not json", 400, "body"),
                    ("/v1/completions", b"[1, 2]", 400, "body"),
                    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
                    ("/v1/completions", {"model": MODEL, "prompt": 7}, 400, "prompt"),
                    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "9"},
                     400, "max_tokens"),
                    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 4096},
                     400, "max_tokens"),
                    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 2}, 400, "n"),
                    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"},
                     400, "stream"),
                    ("/v1/completions", {"model": MODEL, "prompt": "a", "priority": "urgent"},
                     400, "priority"),
                    ("/v1/completions", {"model": MODEL, "prompt": "a", "slo_deadline_ms": -1},
                     400, "slo_deadline_ms"),
                    ("/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
                    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400,
                     "messages"),
                    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]},
                     400, "messages[0]"),
                ]
                for path, body, status, param in cases:
                    if isinstance(body, bytes):
                        resp = await http.post(path, content=body)
                    else:
                        resp = await http.post(path, json=body)
                    assert resp.status_code == status, (body, resp.text)
                    error = resp.json()["error"]
                    assert error["param"] == param, (body, error)
                    assert error["message"]
                bad = await http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "a", "priority": "x"}
                )
                assert "critical, high, normal, low" in bad.json()["error"]["message"]
            text = await metrics_text(url)
            errors = samples(text, "cpsim:http_errors_total")
            assert sum(errors.values()) == len(cases) + 1
            assert samples(text, "cpsim:requests_total") == {}  # none reached the core

    run(main())


def test_api_keys_guard_the_api_and_admin_keys_the_admin_api() -> None:
    async def main() -> None:
        async with running_gateway(api_keys=["k1"], admin_keys=["root"]) as (gw, url):
            body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
            async with httpx.AsyncClient(base_url=url) as http:
                assert (await http.post("/v1/completions", json=body)).status_code == 401
                wrong = {"Authorization": "Bearer nope"}
                resp = await http.post("/v1/completions", json=body, headers=wrong)
                assert resp.status_code == 401
                assert resp.json()["error"]["code"] == "invalid_api_key"
                ok = {"Authorization": "Bearer k1"}
                assert (await http.post("/v1/completions", json=body, headers=ok)).is_success
                assert (await http.get("/admin/instances", headers=ok)).status_code == 401
                admin = {"Authorization": "Bearer root"}
                listed = (await http.get("/admin/instances", headers=admin)).json()
                assert [i["instance_id"] for i in listed] == ["sim-0", "sim-1"]
                assert {"is_healthy", "ejected", "active_requests"} <= set(listed[0])
                # the router and policy at run time; an unknown name says what is allowed
                resp = await http.put("/admin/policy", headers=admin,
                                      json={"routing_strategy": "round_robin"})
                assert resp.json()["routing_strategy"] == "round_robin"
                assert gw.manager.router.routing_strategy == "round_robin"
                resp = await http.put("/admin/policy", headers=admin,
                                      json={"scheduling_policy": "fastest"})
                assert resp.status_code == 400 and "slo_aware" in resp.json()["error"]["message"]
                # register, drain (the instance leaves once empty), unregister
                resp = await http.post("/admin/instances", headers=admin, json={
                    "instance_id": "sim-2", "model_name": MODEL, "max_concurrent_requests": 4})
                assert resp.status_code == 201
                await gw.manager.wait_for_instances(5)
                assert gw.manager.get_status()["available_instances"] == 3
                resp = await http.post("/admin/instances", headers=admin,
                                       json={"instance_id": "x", "flavour": "big"})
                assert resp.status_code == 400 and "flavour" in resp.json()["error"]["message"]
                resp = await http.post("/admin/instances/sim-2/drain", headers=admin)
                assert resp.json() == {"drained": "sim-2", "emptied_in_time": True}
                resp = await http.delete("/admin/instances/sim-1", headers=admin)
                assert resp.is_success
                ids = [i.instance_id for i in gw.manager.get_instances()]
                assert ids == ["sim-0"]
                resp = await http.delete("/admin/instances/sim-9", headers=admin)
                assert resp.status_code == 404 and "sim-0" in resp.json()["error"]["message"]
                status = (await http.get("/admin/status", headers=admin)).json()
                assert status["total_instances"] == 1
                summary = (await http.get("/admin/metrics", headers=admin)).json()
                assert summary["completed_requests"] == 1

    async def no_admin() -> None:
        async with running_gateway() as (_gw, url), httpx.AsyncClient(base_url=url) as http:
            resp = await http.get("/admin/status")
            assert resp.status_code == 403 and "admin_keys" in resp.json()["error"]["message"]

    run(main())
    run(no_admin())


def test_control_plane_quotas_reject_with_429_or_hold_in_the_queue() -> None:
    """The core's quotas (policies/quotas.py) live: a tenant's users share its rate (over it:
    429, code quota_exceeded, naming the tenant); a held request waits in the queue for its
    user's slot and is served once the first request ends."""
    from policies.quotas import Quotas

    async def reject() -> None:
        quotas = Quotas(
            over_limit="reject",
            per_tenant={"requests_per_s": 1.0},
            tenants={"acme": ["ann", "bob"]},
        )
        async with (
            running_gateway(quotas=quotas) as (_gw, url),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            body = {"model": MODEL, "prompt": "a", "max_tokens": 2, "user": "ann"}
            assert (await http.post("/v1/completions", json=body)).is_success
            resp = await http.post("/v1/completions", json=dict(body, user="bob"))
            assert resp.status_code == 429
            error = resp.json()["error"]
            assert error["code"] == "quota_exceeded"
            assert "tenant 'acme' is over requests_per_s=1.0" in error["message"]
            assert (await http.post("/v1/completions", json=dict(body, user="cy"))).is_success
            text = await metrics_text(url)
            ended = samples(text, "cpsim:requests_total")
            assert ended[(("reason", "quota"), ("status", "REJECTED"))] == 1.0

    async def hold() -> None:
        quotas = Quotas(per_user={"max_concurrent": 1})
        async with (
            running_gateway(quotas=quotas) as (gw, url),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            long = {"model": MODEL, "prompt": "a", "max_tokens": 40, "user": "ann"}
            both = await asyncio.gather(
                http.post("/v1/completions", json=long), http.post("/v1/completions", json=long)
            )
            assert all(r.is_success for r in both)
            records = gw.manager.get_request_records().sort_values("dispatch_time_s")
            first, second = records.iloc[0], records.iloc[1]
            assert second["dispatch_time_s"] >= first["finish_time_s"]

    run(reject())
    run(hold())


def test_rate_limits_and_quotas_answer_429_with_retry_after() -> None:
    async def main() -> None:
        settings = {
            "per_user": {"requests_per_s": 1.0},
            "per_key": {"tokens_per_min": 60},
        }
        async with running_gateway(**settings) as (_gw, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                body = {"model": MODEL, "prompt": "a", "max_tokens": 2, "user": "ann"}
                assert (await http.post("/v1/completions", json=body)).is_success
                over = await http.post("/v1/completions", json=body)
                assert over.status_code == 429
                assert int(over.headers["Retry-After"]) >= 1
                assert "requests_per_s" in over.json()["error"]["message"]
                # another user is not held back by ann
                bob = dict(body, user="bob")
                assert (await http.post("/v1/completions", json=bob)).is_success
                # tokens per key: 60/min; a request that could never fit is a 400
                big = {"model": MODEL, "prompt": "a", "max_tokens": 70, "user": "cy"}
                resp = await http.post("/v1/completions", json=big,
                                       headers={"Authorization": "Bearer k"})
                assert resp.status_code == 400 and "tokens_per_min" in resp.text
                first = {"model": MODEL, "prompt": "a", "max_tokens": 40, "user": "dee"}
                key = {"Authorization": "Bearer k"}
                assert (await http.post("/v1/completions", json=first, headers=key)).is_success
                again = dict(first, user="eve")
                resp = await http.post("/v1/completions", json=again, headers=key)
                assert resp.status_code == 429 and "tokens_per_min" in resp.text
            text = await metrics_text(url)
            limited = samples(text, "cpsim:rate_limited_total")
            assert limited == {
                (("limit", "user_requests_per_s"),): 1.0,
                (("limit", "key_tokens_per_min"),): 1.0,
            }

    async def concurrency() -> None:
        async with (
            running_gateway(per_user={"max_concurrent": 1}) as (_gw, url),
            httpx.AsyncClient(base_url=url, timeout=30) as http,
        ):
            long = {"model": MODEL, "prompt": "a", "max_tokens": 60, "user": "ann"}
            first = asyncio.create_task(http.post("/v1/completions", json=long))
            await asyncio.sleep(0.2)
            resp = await http.post("/v1/completions", json=long)
            assert resp.status_code == 429 and "max_concurrent=1" in resp.text
            assert (await first).is_success
            # the slot is free again once the first ended
            assert (await http.post("/v1/completions", json=long)).is_success

    run(main())
    run(concurrency())


def test_a_client_that_disconnects_cancels_its_request_on_the_engine() -> None:
    async def main() -> None:
        async with running_gateway() as (gw, url):
            body = {"model": MODEL, "prompt": "a long one", "max_tokens": 2000, "stream": True}
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    lines = 0
                    async for line in resp.aiter_lines():
                        lines += line.startswith("data:")
                        if lines == 3:
                            break
                # a non-streaming request whose client gives up
                slow = {"model": MODEL, "prompt": "b", "max_tokens": 2000}
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/v1/completions", json=slow, timeout=0.5)
            def running() -> int:  # on the engines: an abort lands when the step in flight ends
                return sum(
                    gw.manager.backend.replica_process(iid).snapshot().num_running
                    for iid in ("sim-0", "sim-1")
                )

            for _ in range(200):
                if gw.manager.core.num_active == 0 and running() == 0:
                    break
                await asyncio.sleep(0.02)
            assert gw.manager.core.num_active == 0
            records = gw.manager.get_request_records()
            assert [str(s) for s in records["status"]] == ["CANCELLED", "CANCELLED"]
            assert running() == 0  # the engines let go of them
            text = await metrics_text(url)
            requests = samples(text, "cpsim:requests_total")
            assert requests == {(("reason", "client_disconnect"), ("status", "CANCELLED")): 2.0}

    run(main())


def test_an_instance_that_fails_every_request_does_not_capture_the_traffic() -> None:
    async def main() -> None:
        async with running_gateway() as (gw, url):
            gw.manager.backend.replica_process("sim-0").add_fault(Fault("fail", at_s=0.0))
            async with client(url) as c:
                answers = []
                for wave in range(10):  # four clients at a time
                    answers += await asyncio.gather(*(
                        c.completions.create(model=MODEL, prompt=f"p{wave}-{i}", max_tokens=3)
                        for i in range(4)
                    ))
                assert all(a.usage.completion_tokens == 3 for a in answers)
                text = await metrics_text(url)
                assert samples(text, "cpsim:requests_total") == {
                    (("reason", "finished"), ("status", "COMPLETED")): 40.0
                }
                retries = samples(text, "cpsim:retries_total")[()]
                routed = samples(text, "cpsim:routing_decisions_total")
                to_bad = routed[(("instance", "sim-0"), ("router", "load_balanced"))]
                assert routed[(("instance", "sim-1"), ("router", "load_balanced"))] == 40
                assert 1 <= to_bad == retries <= 10  # each failure there was retried on sim-1
                assert samples(text, "cpsim:instance_error_rate")[(("instance", "sim-0"),)] > 0.5

    run(main())


def test_a_crash_after_the_first_token_ends_the_stream_with_an_error_event() -> None:
    async def main() -> None:
        async with running_gateway(instances=sim_instances(1)) as (gw, url):
            body = {"model": MODEL, "prompt": "a", "max_tokens": 2000, "stream": True}
            events = []
            async with (
                httpx.AsyncClient(base_url=url, timeout=30) as http,
                http.stream("POST", "/v1/completions", json=body) as resp,
            ):
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        if len(events) == 2:
                            gw.manager.backend.replica_process("sim-0").crash("boom")
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert "boom" in error["message"] and error["code"] == "instance_failure"
            assert await gw.manager.get_request_status(
                gw.manager.get_request_records()["request_id"][0]
            ) is RequestStatus.FAILED

    run(main())


def test_a_request_no_instance_can_take_fails_with_its_reason() -> None:
    async def main() -> None:
        config = ControlPlaneConfig(queue_timeout_s=0.3)
        async with running_gateway(instances=sim_instances(1), config=config) as (gw, url):
            gw.manager.core.drain_instance("sim-0")  # takes nothing new
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                resp = await http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}
                )
            assert resp.status_code == 504
            assert "queued longer than 0.3 s" in resp.json()["error"]["message"]

    run(main())


def test_cpsim_fields_reach_the_scheduler_from_body_or_headers() -> None:
    async def main() -> None:
        async with running_gateway() as (gw, url), client(url) as c:
            await c.completions.create(
                model=MODEL, prompt="a", max_tokens=2, user="ann",
                extra_body={"priority": "high", "slo_deadline_ms": 5000},
            )
            await c.completions.create(
                model=MODEL, prompt="b", max_tokens=2,
                extra_headers={"X-Cpsim-Priority": "critical", "X-Cpsim-Cost-Budget": "0.5"},
            )
            records = gw.manager.get_request_records().sort_values("arrival_time_s")
            assert [str(p) for p in records["priority"]] == ["HIGH", "CRITICAL"]
            assert [str(u) for u in records["user_id"]] == ["ann", "anonymous"]
            assert records["slo_deadline_ms"].iloc[0] == 5000
            assert bool(records["slo_met"].iloc[0])
            text = await metrics_text(url)
            assert samples(text, "cpsim:slo_checked_total")[()] == 1.0
            assert samples(text, "cpsim:goodput_requests_total")[()] == 2.0

    run(main())


def test_every_request_ends_once_and_metrics_count_each() -> None:
    """Completed, disconnected, rejected (a full queue) and refused requests, together:
    each submitted request has one terminal state and one count in /metrics."""

    async def main() -> None:
        config = ControlPlaneConfig(max_queue_len=2)
        instances = sim_instances(1, max_concurrent_requests=2)
        async with running_gateway(instances=instances, config=config) as (gw, url):
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:

                async def one(i: int) -> int:
                    body = {"model": MODEL, "prompt": f"p{i}", "max_tokens": 30}
                    if i % 5 == 0:  # a client that gives up before its answer
                        try:
                            resp = await http.post("/v1/completions", json=body, timeout=0.3)
                        except httpx.TimeoutException:
                            return 0
                        return resp.status_code
                    return (await http.post("/v1/completions", json=body)).status_code

                codes = await asyncio.gather(*(one(i) for i in range(30)))
            for _ in range(300):
                if gw.manager.core.num_active == 0:
                    break
                await asyncio.sleep(0.02)
            records = gw.manager.get_request_records()
            assert records["request_id"].is_unique
            text = await metrics_text(url)
            counted = samples(text, "cpsim:requests_total")
            # a client that gave up before the gateway read its body submitted nothing
            assert sum(counted.values()) == len(records) >= 24
            by_status = records["status"].value_counts().to_dict()
            for status, n in by_status.items():
                got = sum(v for k, v in counted.items() if ("status", status) in k)
                assert got == n
            assert codes.count(200) == by_status.get("COMPLETED", 0)
            assert codes.count(503) == by_status.get("REJECTED", 0) > 0

    run(main())


def test_shutdown_cancels_what_is_still_running() -> None:
    async def main() -> None:
        async with running_gateway() as (gw, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                body = {"model": MODEL, "prompt": "a", "max_tokens": 2000, "stream": True}
                rest: list[str] = []
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line and not rest:
                            await gw.stop()
                        if line:
                            rest.append(line)
            assert rest[-1] == "data: [DONE]"
            assert "shutdown" in rest[-2]
            records = gw.manager.get_request_records()
            assert [str(s) for s in records["status"]] == ["CANCELLED"]
            refused = await asyncio.to_thread(
                lambda: httpx.post(f"{url}/v1/completions", json=body).status_code
            )
            assert refused == 503

    run(main())


def test_ready_says_whether_any_instance_can_serve() -> None:
    async def main() -> None:
        async with (
            running_gateway(instances=[]) as (gw, url),
            httpx.AsyncClient(base_url=url) as http,
        ):
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/ready")).status_code == 503
            gw.manager.register_instance(sim_instances(1)[0])
            await gw.manager.wait_for_instances(5)
            assert (await http.get("/ready")).status_code == 200
            resp = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert resp.is_success  # the one model served, when none is named

    run(main())


def test_lora_adapters_are_models_served_only_where_loaded() -> None:
    # sim-0 serves the adapter "sql" beside the base model, sim-1 the base model only
    instances = sim_instances(2)
    instances[0].metadata.update(lora_adapters=["sql"], max_loras=2)

    async def main() -> None:
        async with running_gateway(instances) as (gw, url), client(url) as c:
            models = {m.id: m for m in (await c.models.list()).data}
            assert set(models) == {MODEL, "sql"}
            assert models["sql"].model_extra["parent"] == MODEL
            assert models[MODEL].model_extra["parent"] is None
            for _ in range(6):
                done = await c.completions.create(model="sql", prompt="q", max_tokens=3)
                assert done.model == "sql" and done.usage.completion_tokens == 3
            with pytest.raises(openai.NotFoundError, match="nosuch"):
                await c.completions.create(model="nosuch", prompt="q", max_tokens=3)
            await c.completions.create(model=MODEL, prompt="q", max_tokens=3)
            records = gw.manager.get_request_records()
            on = records[records["model_name"].astype(str) == "sql"]["instance_id"]
            assert set(on.astype(str)) == {"sim-0"}
            assert set(gw.manager.get_metrics().models) == {MODEL, "sql"}

    run(main())
