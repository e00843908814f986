"""HTTP backend ("vllm_http"): vLLM OpenAI servers at each instance's ``host:port``.

Each dispatch streams ``/v1/completions`` (prompt as token ids, ``ignore_eos``,
``return_token_ids``, usage in the last chunk) and counts ``len(token_ids)`` per chunk.
An instance is checked once when added, and routed to only once a check has passed.
``/health`` is polled every ``health_interval_s``: ``unhealthy_after`` failures in a row
(failed probes, or streams whose connection broke) report ``on_instance_failure``; the
first good probe after that reports ``on_instance_recovered``. ``/metrics`` is scraped every
``scrape_interval_s`` into InstanceSnapshots. A cancel closes the stream (vLLM then aborts).
PREFILL/DECODE dispatches use vLLM's ``kv_transfer_params`` protocol (see ``pd``).
A request a client waits for (``client_streams``, the gateway's: ``cpsim.streams``) is sent
as the client's own body to its endpoint (completions or chat), and every chunk the engine
streams goes back to the client.
Needs aiohttp (``pip install -e ".[http]"``), imported when the backend starts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backends.vllm.metrics_scrape import MetricsScraper
from backends.vllm.pd import PREFILL_KV_PARAMS, HandoffStore
from backends.vllm.prompts import prompt_token_ids
from cpsim.backend import Clock, EngineEvents, check_started
from cpsim.core import Abort, Dispatch
from cpsim.streams import ClientStream
from cpsim.types import ExecutionInstance
from cpsim.validation import check_positive
from cpsim.views import Phase


@dataclass
class _Server:
    instance_id: str
    endpoint: str
    scraper: MetricsScraper
    vocab_size: int
    healthy: bool = True
    failures: int = 0
    adapters: frozenset[str] = frozenset()  # LoRA adapters it serves (requests name them)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)


class HTTPBackend:
    """Backend of vLLM OpenAI servers; see the module docstring. Per instance,
    ``metadata["vocab_size"]`` bounds synthesized prompt ids (default 32000)."""

    name = "vllm_http"

    def __init__(
        self,
        connect_timeout_s: float = 5.0,
        first_token_timeout_s: float = 300.0,
        idle_timeout_s: float = 60.0,
        health_interval_s: float = 1.0,
        health_timeout_s: float = 2.0,
        unhealthy_after: int = 2,
        scrape_interval_s: float = 0.5,
        model: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (
            ("connect_timeout_s", connect_timeout_s),
            ("first_token_timeout_s", first_token_timeout_s),
            ("idle_timeout_s", idle_timeout_s),
            ("health_interval_s", health_interval_s),
            ("health_timeout_s", health_timeout_s),
            ("scrape_interval_s", scrape_interval_s),
        ):
            check_positive(name, value)
        check_positive("unhealthy_after", unhealthy_after, integer=True)
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.unhealthy_after = unhealthy_after
        self.scrape_interval_s = scrape_interval_s
        self.model = model
        self.extra_body = dict(extra_body or {})
        self.client_streams: dict[str, ClientStream] = {}
        self._servers: dict[str, _Server] = {}
        self._handoffs = HandoffStore()
        self._events: EngineEvents | None = None
        self._clock: Clock = lambda: 0.0
        self._session: Any = None
        self._loops: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ Backend
    async def start(self, events: EngineEvents, clock: Clock) -> None:
        import aiohttp

        self._events, self._clock = events, clock
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._loops = [
            asyncio.create_task(self._health_loop()),
            asyncio.create_task(self._scrape_loop()),
        ]

    async def stop(self) -> None:
        tasks = list(self._loops)
        for server in self._servers.values():
            tasks += server.tasks.values()
            server.tasks.clear()
        self._loops = []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def add_instance(self, instance: ExecutionInstance) -> bool:
        """Add a server after one /health check: True when it passed; else the server is
        down until a later check of the health loop passes (``on_instance_recovered``)."""
        iid = instance.instance_id
        check_started(self, self._events, iid)
        if iid in self._servers:
            raise ValueError(f"instance_id={iid!r} is already added")
        vocab = int(instance.metadata.get("vocab_size", 32000))
        server = _Server(iid, instance.endpoint, MetricsScraper(iid), vocab, healthy=False,
                         adapters=instance.lora_adapters)  # fmt: skip
        self._servers[iid] = server
        server.healthy = await self._answers_health(server)  # up from the start: no event
        return server.healthy

    async def remove_instance(self, instance_id: str) -> None:
        server = self._servers.pop(instance_id, None)
        if server is not None:
            for task in server.tasks.values():
                task.cancel()

    def dispatch(self, dispatch: Dispatch) -> None:
        server = self._server(dispatch.instance_id)
        coro = self._prefill(dispatch, server) if dispatch.phase is Phase.PREFILL else None
        task = asyncio.create_task(coro or self._serve(dispatch, server))
        server.tasks[dispatch.request_id] = task

    def abort(self, abort: Abort) -> None:
        """Close the request's stream: vLLM aborts a request whose client disconnects."""
        self._handoffs.pop(abort.request_id)
        server = self._servers.get(abort.instance_id)
        task = None if server is None else server.tasks.pop(abort.request_id, None)
        if task is not None:
            task.cancel()

    # ------------------------------------------------------------------ introspection
    def is_healthy(self, instance_id: str) -> bool:
        return self._server(instance_id).healthy

    def in_flight(self, instance_id: str) -> int:
        return len(self._server(instance_id).tasks)

    def _server(self, instance_id: str) -> _Server:
        server = self._servers.get(instance_id)
        if server is None:
            known = ", ".join(self._servers) or "none"
            raise ValueError(f"instance_id={instance_id!r} is not added; known: {known}")
        return server

    # ------------------------------------------------------------------ serving
    def _timeouts(self) -> Any:
        from backends.vllm.http_stream import StreamTimeouts

        return StreamTimeouts(
            self.connect_timeout_s, self.first_token_timeout_s, self.idle_timeout_s
        )

    def _url(self, d: Dispatch, server: _Server) -> str:
        client = self.client_streams.get(d.request_id)
        api = "completions" if client is None else client.api.replace(".", "/")
        return f"{server.endpoint}/v1/{api}"

    def _body(self, d: Dispatch, server: _Server, max_tokens: int, stream: bool) -> dict[str, Any]:
        from backends.vllm.http_stream import completion_body

        client = self.client_streams.get(d.request_id)
        if client is not None:
            return self._client_body(d, client, stream)
        extra = dict(self.extra_body)
        if self.model is not None:
            extra["model"] = self.model
        if d.request.model_name in server.adapters:  # the engine serves it as a model
            extra["model"] = d.request.model_name
        if d.phase is Phase.PREFILL:
            extra["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
        elif d.phase is Phase.DECODE:
            params = self._handoffs.pop(d.request_id)
            if params:
                extra["kv_transfer_params"] = params
        ids = prompt_token_ids(d.request, server.vocab_size)
        return completion_body(ids, max_tokens, stream, extra)

    def _client_body(self, d: Dispatch, client: ClientStream, stream: bool) -> dict[str, Any]:
        """The client's body (streamed, with usage and token ids: the gateway set them);
        a PREFILL of it computes one token and keeps the KV for the decode engine."""
        body = dict(client.body)
        if self.model is not None:
            body["model"] = self.model
        if d.phase is Phase.PREFILL:
            body.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_KV_PARAMS))
            body.pop("stream_options", None)
            body.pop("max_completion_tokens", None)
        elif d.phase is Phase.DECODE:
            params = self._handoffs.pop(d.request_id)
            if params:
                body["kv_transfer_params"] = params
        return body

    async def _serve(self, d: Dispatch, server: _Server) -> None:
        from backends.vllm.http_stream import stream_completion

        events, rid, iid = self._events, d.request_id, d.instance_id
        assert events is not None
        count = [0]

        def on_tokens(k: int) -> None:
            now = self._clock()
            if count[0] == 0:
                events.on_first_token(rid, iid, now)
                if k > 1:
                    events.on_tokens(rid, iid, k - 1, now)
            else:
                events.on_tokens(rid, iid, k, now)
            count[0] += k

        try:
            body = self._body(d, server, d.request.max_tokens, stream=True)
            client = self.client_streams.get(rid)
            result = await stream_completion(
                self._session,
                self._url(d, server),
                body,
                {"X-Request-Id": rid},
                self._timeouts(),
                on_tokens,
                None if client is None else client.on_chunk,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._report_error(d, server, exc, count[0])
            return
        finally:
            if server.tasks.get(rid) is asyncio.current_task():
                del server.tasks[rid]
        if server.healthy:
            server.failures = 0
        extras = {}
        if result.usage_completion_tokens is not None:
            extras["usage_completion_tokens"] = float(result.usage_completion_tokens)
        events.on_finish(rid, iid, result.num_tokens, self._clock(), extras)

    async def _prefill(self, d: Dispatch, server: _Server) -> None:
        from backends.vllm.http_stream import prefill_completion

        events, rid, iid = self._events, d.request_id, d.instance_id
        assert events is not None
        try:
            body = self._body(d, server, 1, stream=False)
            result = await prefill_completion(
                self._session, self._url(d, server), body, {"X-Request-Id": rid}, self._timeouts()
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._report_error(d, server, exc, 0)
            return
        finally:
            if server.tasks.get(rid) is asyncio.current_task():
                del server.tasks[rid]
        self._handoffs.put(rid, result.kv_transfer_params)
        events.on_prefill_done(rid, iid, self._clock())

    def _report_error(self, d: Dispatch, server: _Server, exc: Exception, num: int) -> None:
        """One report per request: a broken connection first counts against the server
        (which may fail the instance, and with it this request, in the core); then the
        request's own failure, which the core ignores if the request already left."""
        from backends.vllm.http_stream import ServerError, StreamBroken

        events, iid = self._events, server.instance_id
        assert events is not None
        reason = f"instance {iid}: {exc}"
        retryable = num == 0
        instance_fault = True  # the server's, unless it says the request was at fault
        if isinstance(exc, StreamBroken):
            self._note_failure(server, reason)
        elif isinstance(exc, ServerError):
            retryable = retryable and exc.retryable
            instance_fault = exc.retryable
        elif isinstance(exc, ValueError):  # bad prompt ids
            retryable = instance_fault = False
        events.on_failure(d.request_id, iid, reason, self._clock(), retryable, instance_fault)

    # ------------------------------------------------------------------ health, metrics
    def _note_failure(self, server: _Server, reason: str) -> None:
        server.failures += 1
        if server.healthy and server.failures >= self.unhealthy_after:
            server.healthy = False
            # the core requeues or fails what ran there: close those streams unreported
            current = asyncio.current_task()
            for rid, task in list(server.tasks.items()):
                if task is not current:
                    task.cancel()
                    del server.tasks[rid]
            assert self._events is not None
            self._events.on_instance_failure(server.instance_id, reason, self._clock())

    def _note_success(self, server: _Server) -> None:
        server.failures = 0
        if not server.healthy:
            server.healthy = True
            assert self._events is not None
            self._events.on_instance_recovered(server.instance_id, self._clock())

    async def _get(self, server: _Server, path: str) -> tuple[int, str]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.health_timeout_s)
        async with self._session.get(f"{server.endpoint}{path}", timeout=timeout) as resp:
            return resp.status, await resp.text()

    async def _answers_health(self, server: _Server) -> bool:
        try:
            status, _ = await self._get(server, "/health")
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        return status == 200

    async def probe(self, server: _Server) -> bool:
        """One /health check; counts towards failing or recovering the instance."""
        ok = await self._answers_health(server)
        if server.instance_id not in self._servers:
            return ok
        if ok:
            self._note_success(server)
        else:
            self._note_failure(server, f"/health failed {server.failures + 1} times in a row")
        return ok

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self.probe(s) for s in list(self._servers.values())))

    async def _scrape(self, server: _Server) -> None:
        if not server.healthy:
            return
        try:
            status, text = await self._get(server, "/metrics")
        except asyncio.CancelledError:
            raise
        except Exception:
            return  # health checks decide about failures
        if status == 200 and self._events is not None:
            now = self._clock()
            self._events.on_snapshot(server.scraper.snapshot(text, now), now)

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scrape_interval_s)
            await asyncio.gather(*(self._scrape(s) for s in list(self._servers.values())))
