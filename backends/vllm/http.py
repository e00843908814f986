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
A decoding request can move to another engine by recompute (``MigratingBackend``; vLLM
cannot hand over a running request's KV): its stream is closed (vLLM aborts it) and a
completion continues it on the target, with the prompt's and the output's token ids so far
as its prompt and the tokens still to make as ``max_tokens``; the client's stream goes on,
its chunks and usage as if nothing had moved (see ``_Flight``).
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
from cpsim.types import ExecutionInstance, RequestMetadata
from cpsim.validation import check_positive
from cpsim.views import DecodeView, Phase

#: Body fields a continuation (a completion of prompt and output so far) carries over as
#: they are, and those it sets itself; a body with any other field cannot move (tools,
#: logprobs, a response format: their meaning would change or be lost on the way).
CARRIED_FIELDS = frozenset({
    "model", "user", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
})  # fmt: skip
REPLACED_FIELDS = frozenset({
    "prompt", "messages", "max_tokens", "min_tokens", "n", "stream", "stream_options",
    "return_token_ids", "kv_transfer_params",
})  # fmt: skip


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


@dataclass
class _Flight:
    """A request streaming on an engine, as far as continuing it elsewhere needs: the body
    its first stream was sent, its prompt's token ids (the engine's first chunk returns
    them) and every output token id so far. ``num_before``: output tokens of earlier
    streams (a continuation's chunks and usage are shifted by them for the client)."""

    dispatch: Dispatch
    body: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] | None = None
    output_ids: list[int] = field(default_factory=list)
    num_made: int = 0  # output tokens reported to the control plane, all streams
    num_before: int = 0
    moving: bool = False  # its stream was stopped for a migration
    stopped_s: float | None = None  # when; the pause runs until the target's first token
    pause_s: float = 0.0  # all its migrations' pauses

    def note(self, chunk: Mapping[str, Any]) -> None:
        """Keep the token ids a chunk carries (the prompt's come with the first)."""
        if self.prompt_ids is None and chunk.get("prompt_token_ids"):
            self.prompt_ids = list(chunk["prompt_token_ids"])  # chat: on the chunk
        for choice in chunk.get("choices") or ():
            if self.prompt_ids is None and choice.get("prompt_token_ids"):
                self.prompt_ids = list(choice["prompt_token_ids"])  # completions: its choice
            self.output_ids += choice.get("token_ids") or ()

    def problem(self) -> str | None:
        """Why it cannot continue elsewhere now; None when it can."""
        rid = self.dispatch.request_id
        if self.moving:
            return f"request {rid!r} is being moved already"
        if self.prompt_ids is None or len(self.output_ids) != self.num_made:
            return (f"request {rid!r}: its engine did not return the prompt's and output's "
                    "token ids (return_token_ids), so it cannot be continued elsewhere")
        odd = sorted(set(self.body) - CARRIED_FIELDS - REPLACED_FIELDS)
        if odd:
            return (f"request {rid!r} has {', '.join(odd)}, which a continuation cannot "
                    f"carry; it carries {', '.join(sorted(CARRIED_FIELDS))}")
        if self.num_made >= self.dispatch.request.max_tokens:
            return f"request {rid!r} has made all its {self.num_made} tokens"
        return None

    def continuation(self) -> dict[str, Any]:
        """The completion that goes on from here: prompt and output so far as its prompt."""
        from backends.vllm.http_stream import completion_body

        assert self.prompt_ids is not None
        body = {k: v for k, v in self.body.items() if k in CARRIED_FIELDS}
        min_tokens = self.body.get("min_tokens")
        if min_tokens:
            body["min_tokens"] = max(0, int(min_tokens) - self.num_made)
        remaining = self.dispatch.request.max_tokens - self.num_made
        return completion_body([*self.prompt_ids, *self.output_ids], remaining, True, body)

    def for_client(self, chunk: dict[str, Any], api: str) -> dict[str, Any]:
        """A continuation's chunk as the client's stream goes on: in its API's format,
        without the longer prompt's ids, the usage counting from the client's prompt."""
        out = dict(chunk)
        out.pop("prompt_token_ids", None)
        choices = []
        for choice in chunk.get("choices") or ():
            text = choice.get("text") or ""
            c = {k: v for k, v in choice.items() if k not in ("prompt_token_ids", "text")}
            if api == "chat.completions":
                c["delta"] = {"content": text}
            else:
                c["text"] = text
            choices.append(c)
        out["choices"] = choices
        if api == "chat.completions":
            out["object"] = "chat.completion.chunk"
        usage = chunk.get("usage")
        if usage and self.prompt_ids is not None:
            prompt = len(self.prompt_ids)
            made = self.num_before + int(usage.get("completion_tokens") or 0)
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": made,
                            "total_tokens": prompt + made}  # fmt: skip
        return out



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
        self._flights: dict[str, _Flight] = {}  # requests streaming (or moving), by id
        self._handoffs = HandoffStore()
        self._events: EngineEvents | None = None
        self._clock: Clock = lambda: 0.0
        self._session: Any = None
        self._loops: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ Backend
    async def start(self, events: EngineEvents, clock: Clock) -> None:
        import aiohttp
        import orjson

        self._events, self._clock = events, clock
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            json_serialize=lambda body: orjson.dumps(body).decode(),
        )
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
        self._flights.pop(abort.request_id, None)
        server = self._servers.get(abort.instance_id)
        task = None if server is None else server.tasks.pop(abort.request_id, None)
        if task is not None:
            task.cancel()

    # ------------------------------------------------------------------ migration
    def decoding(self) -> dict[str, list[DecodeView]]:
        """The requests decoding on each healthy server (streaming, not being moved), with
        their share of its KV cache: their blocks over its ``vllm:cache_config_info``, or,
        where that is not exported, its scraped KV usage shared out by context length. A
        server with neither (not scraped yet) is left out."""
        out: dict[str, list[DecodeView]] = {}
        for iid, server in self._servers.items():
            cache = server.scraper  # its KV cache's size and usage, as last scraped
            if not server.healthy or (cache.num_blocks is None and cache.kv_usage_frac is None):
                continue
            flights = [self._flights.get(rid) for rid in server.tasks]
            decoding = [f for f in flights if f is not None and f.num_made and not f.moving]
            contexts = [len(f.prompt_ids or ()) + f.num_made for f in decoding]
            total = sum(contexts)
            views = out[iid] = []
            for flight, context in zip(decoding, contexts, strict=True):
                if cache.num_blocks is not None:
                    share = -(-context // cache.block_size) / cache.num_blocks
                else:
                    share = (cache.kv_usage_frac or 0.0) * context / total
                remaining = flight.dispatch.request.max_tokens - flight.num_made
                views.append(DecodeView(flight.dispatch.request_id, iid, context, remaining, share))
        return out

    def migration_problem(self, request_id: str) -> str | None:
        """Why the request cannot be moved now (not streaming here, no token ids, a body
        field a continuation cannot carry, no tokens left to make); None when it can."""
        flight = self._flights.get(request_id)
        server = None if flight is None else self._servers.get(flight.dispatch.instance_id)
        if flight is None or server is None or request_id not in server.tasks:
            return f"request {request_id!r} is not streaming from a server of this backend"
        return flight.problem()

    def stop_for_migration(self, request_id: str) -> int:
        """Close the request's stream (vLLM aborts it) and return the output tokens it made
        in all; nothing more is reported of it until ``continue_request``. Only after
        ``migration_problem`` said None."""
        flight = self._flights[request_id]
        task = self._servers[flight.dispatch.instance_id].tasks.pop(request_id)
        task.cancel()  # it is parked at a read: what it reported so far is all it made
        flight.moving = True
        flight.stopped_s = self._clock()
        return flight.num_made

    def continue_request(self, request: RequestMetadata, instance_id: str) -> None:
        """Continue a request stopped by ``stop_for_migration`` on ``instance_id``, with
        its prompt and output so far as the prompt (the engine computes their KV again)."""
        flight = self._flights[request.request_id]
        flight.moving = False
        flight.num_before = flight.num_made
        flight.dispatch = flight.dispatch._replace(instance_id=instance_id)
        self.dispatch(flight.dispatch)

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
        client = self.client_streams.get(rid)
        flight = self._flights.get(rid)
        resumed = flight is not None  # a continuation after a migration
        if flight is None:
            flight = self._flights[rid] = _Flight(d)

        def on_tokens(k: int) -> None:
            now = self._clock()
            if flight.stopped_s is not None:  # the first token since it was moved
                flight.pause_s += now - flight.stopped_s
                flight.stopped_s = None
            first = flight.num_made == 0
            flight.num_made += k  # before the events: a listener may move the request
            if first:
                events.on_first_token(rid, iid, now)
                if k > 1:
                    events.on_tokens(rid, iid, k - 1, now)
            else:
                events.on_tokens(rid, iid, k, now)

        def on_chunk(chunk: dict[str, Any]) -> None:
            flight.note(chunk)
            if client is not None:
                client.on_chunk(flight.for_client(chunk, client.api) if resumed else chunk)

        try:
            if resumed:
                url, body = f"{server.endpoint}/v1/completions", flight.continuation()
            else:
                url = self._url(d, server)
                body = flight.body = self._body(d, server, d.request.max_tokens, stream=True)
            result = await stream_completion(
                self._session, url, body, {"X-Request-Id": rid}, self._timeouts(), on_tokens,
                on_chunk,
            )  # fmt: skip
        except asyncio.CancelledError:
            self._forget(flight, d)
            raise
        except Exception as exc:
            self._forget(flight, d)
            self._report_error(d, server, exc, flight.num_made)
            return
        finally:
            if server.tasks.get(rid) is asyncio.current_task():
                del server.tasks[rid]
        self._forget(flight, d)
        if server.healthy:
            server.failures = 0
        extras = {}
        if result.usage_completion_tokens is not None:
            usage = flight.num_before + result.usage_completion_tokens
            extras["usage_completion_tokens"] = float(usage)
        if resumed:
            extras["migration_pause_s"] = flight.pause_s
        events.on_finish(rid, iid, result.num_tokens, self._clock(), extras)

    def _forget(self, flight: _Flight, d: Dispatch) -> None:
        """Drop the request's flight when its stream ``d`` ended, unless the stream was
        stopped to move it (then the flight goes on, on the target)."""
        if flight.dispatch is d and not flight.moving:
            self._flights.pop(d.request_id, None)

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
