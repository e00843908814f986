"""HTTPBackend's stream timeouts and failing servers, against a stand-in OpenAI server that
misbehaves on purpose.

A real vLLM server does not stall or fail on cue, so these run against a small aiohttp
server: one instance never sends a first token, one sends a token and then nothing, one
answers every request with a 500 at once (a black hole). The manager must retry the first
request elsewhere (no token yet), fail the second with a reason naming the timeout (a
token already streamed cannot be taken back), and keep the traffic off the black hole."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
web = pytest.importorskip("aiohttp.web")

from backends.vllm.http import HTTPBackend  # noqa: E402
from cpsim.manager import ControlPlaneManager  # noqa: E402
from cpsim.types import ExecutionInstance, RequestMetadata, RequestStatus  # noqa: E402
from policies import ROUTERS  # noqa: E402

TIMEOUT_S = 0.3


def _chunk(token_ids: list[int], finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": "", "token_ids": token_ids, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def _server(mode: str, release: asyncio.Event) -> Any:
    """``mode``: "silent" (headers, then nothing until ``release``), "one_token" (one token,
    then the same), "fail" (HTTP 500 at once) or "ok" (all tokens at once)."""

    async def completions(request: Any) -> Any:
        body = await request.json()
        if mode == "fail":
            return web.Response(status=500, text="engine error")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if mode == "ok":
            for _ in range(body["max_tokens"]):
                await resp.write(_chunk([7]))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if mode == "one_token":
            await resp.write(_chunk([7]))
        await release.wait()  # the client gives up long before; set at teardown
        return resp

    async def health(_request: Any) -> Any:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", health)
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(
    modes: dict[str, str], release: asyncio.Event
) -> tuple[list[Any], list[ExecutionInstance]]:
    runners, instances = [], []
    for iid, mode in modes.items():
        runner = web.AppRunner(_server(mode, release))
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        instances.append(ExecutionInstance(iid, host="127.0.0.1", port=port, model_name="m"))
    return runners, instances


async def _run(
    modes: dict[str, str],
    requests: list[RequestMetadata],
    router: str = "round_robin",
    gap_s: float = 0.0,
) -> dict[str, Any]:
    """Serve ``requests`` (one every ``gap_s``) over one stand-in server per mode."""
    release = asyncio.Event()
    runners, instances = await _serve(modes, release)
    backend = HTTPBackend(first_token_timeout_s=TIMEOUT_S, idle_timeout_s=TIMEOUT_S,
                          health_interval_s=5.0)
    cp = ControlPlaneManager(routing_strategy=router, backend=backend,
                             enable_monitoring=False)
    try:
        for inst in instances:
            cp.register_instance(inst)
        await cp.start()
        for meta in requests:
            await cp.submit_request(meta)
            if gap_s:
                await asyncio.sleep(gap_s)
        statuses = {m.request_id: await cp.wait_for_request(m.request_id, timeout_s=10.0)
                    for m in requests}
        return {"statuses": statuses, "records": cp.get_request_records()}
    finally:
        await cp.stop()
        release.set()
        for runner in runners:
            await runner.cleanup()


def test_no_first_token_in_time_is_retried_on_another_instance() -> None:
    meta = RequestMetadata("r0", num_prompt_tokens=8, max_tokens=4)
    out = asyncio.run(_run({"silent": "silent", "ok": "ok"}, [meta]))
    records = out["records"].set_index("request_id")
    assert out["statuses"]["r0"] is RequestStatus.COMPLETED
    assert records.loc["r0", "instance_id"] == "ok"
    assert records.loc["r0", "attempts"] == 2
    assert records.loc["r0", "num_output_tokens"] == 4


def test_a_stream_that_stalls_after_a_token_fails_with_the_timeout_as_reason() -> None:
    meta = RequestMetadata("r0", num_prompt_tokens=8, max_tokens=4)
    out = asyncio.run(_run({"stall": "one_token"}, [meta]))
    records = out["records"].set_index("request_id")
    assert out["statuses"]["r0"] is RequestStatus.FAILED
    reason = str(records.loc["r0", "reason"])
    assert "no next chunk within 0.3 s (after 1 tokens)" in reason and "stall" in reason


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_a_server_that_fails_every_request_at_once_does_not_capture_the_traffic(
    router: str,
) -> None:
    """The black hole finishes (fails) its requests instantly, so it looks the least loaded;
    before failure-aware routing load-aware routers sent it everything, retries included."""
    requests = [
        RequestMetadata(f"r{i}", user_id=f"u{i % 7}", num_prompt_tokens=8, max_tokens=4)
        for i in range(100)
    ]
    out = asyncio.run(_run({"hole": "fail", "ok": "ok"}, requests, router, gap_s=0.005))
    statuses = list(out["statuses"].values())
    assert statuses.count(RequestStatus.COMPLETED) >= 95, out["records"]["reason"].value_counts()
    records = out["records"]
    assert (records.loc[records["status"] == "COMPLETED", "instance_id"] == "ok").all()


def test_a_stream_ends_at_done_and_its_connection_serves_the_next() -> None:
    """A server that ends its body only a while after ``[DONE]`` (as a busy one may): the
    stream returns at ``[DONE]``, before the body ends, and once it has ended the same
    connection carries the next request (aiohttp closes a response released early)."""
    from backends.vllm.http_stream import StreamTimeouts, completion_body, stream_completion

    async def main() -> tuple[list[bool], int]:
        ended = asyncio.Event()

        async def completions(request: Any) -> Any:
            ended.clear()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_chunk([7], "length") + b"data: [DONE]\n\n")
            await asyncio.sleep(0.05)
            ended.set()
            return resp  # the body's end goes out now

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        port = _free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        created, ended_at_return = [0], []

        async def on_create(*_: Any) -> None:
            created[0] += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_create)
        url = f"http://127.0.0.1:{port}/v1/completions"
        try:
            async with aiohttp.ClientSession(trace_configs=[trace]) as session:
                for _ in range(3):
                    result = await stream_completion(
                        session, url, completion_body([1, 2], 1, True), {},
                        StreamTimeouts(5.0, 5.0, 5.0), lambda _k: None,
                    )  # fmt: skip
                    ended_at_return.append(ended.is_set())
                    assert result.num_tokens == 1 and result.finish_reason == "length"
                    await ended.wait()
                    await asyncio.sleep(0.05)  # the body's end read in the background
        finally:
            await runner.cleanup()
        return ended_at_return, created[0]

    ended_at_return, created = asyncio.run(main())
    assert ended_at_return == [False, False, False]  # not held up by the body's end
    assert created == 1  # one connection for the three requests
