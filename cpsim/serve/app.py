"""The OpenAI-compatible gateway: an ASGI app (FastAPI) over a ``ControlPlaneManager``.

Each client request becomes a control-plane request: the scheduling policy orders it, the
router places it, and the backend runs it, on a real engine (which gets the client's body)
or a simulated one; what the engine streams comes back to the client through a
``ClientStream`` (``cpsim.streams``). No policy code is here: the gateway parses, checks
keys and limits, and relays. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cpsim.requests import RequestState
from cpsim.serve.limits import Limit, Limiter, Refused
from cpsim.serve.openai_api import (
    PREFIX_BLOCK_TOKENS,
    ApiError,
    ParsedRequest,
    assemble,
    client_chunk,
    parse_request,
)
from cpsim.serve.prom import GatewayMetrics, reason_category
from cpsim.streams import Api, ClientStream
from cpsim.types import ExecutionInstance, RequestMetadata, RequestStatus

log = logging.getLogger("cpsim.serve")


@dataclass
class ServerSettings:
    """``server:`` of conf/serve.yaml. Keys: ``api_keys``, plus one per line of
    ``api_keys_file`` and the comma-separated ``$CPSIM_API_KEYS``; none at all: the API is
    open. ``admin_keys`` likewise (``$CPSIM_ADMIN_KEYS``); none: the admin API is off.
    ``max_model_len``: a model's context limit where its instances do not say
    (``metadata["max_model_len"]``). ``shutdown_grace_s``: how long in-flight requests
    may finish after SIGTERM before they are cancelled."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: str | None = None
    admin_keys: list[str] = field(default_factory=list)
    per_key: dict[str, Any] = field(default_factory=dict)
    per_user: dict[str, Any] = field(default_factory=dict)
    default_max_tokens: int = 256
    max_model_len: dict[str, int] = field(default_factory=dict)
    shutdown_grace_s: float = 30.0
    drain_timeout_s: float = 300.0
    log_level: str = "info"

    def keys(self) -> set[str]:
        keys = set(self.api_keys) | _env_keys("CPSIM_API_KEYS")
        if self.api_keys_file:
            lines = Path(self.api_keys_file).read_text().splitlines()
            keys |= {line.strip() for line in lines if line.strip() and not line.startswith("#")}
        return keys

    def admin(self) -> set[str]:
        return set(self.admin_keys) | _env_keys("CPSIM_ADMIN_KEYS")


def _env_keys(name: str) -> set[str]:
    return {k.strip() for k in os.environ.get(name, "").split(",") if k.strip()}


class _Client:
    """One request a client waits for: the chunks not yet sent, and how it ended."""

    __slots__ = ("admitted", "cancel_reason", "chunks", "done", "end", "parsed", "wake")

    def __init__(self, parsed: ParsedRequest, admitted: list[tuple[str, str]]) -> None:
        self.parsed = parsed
        self.admitted = admitted
        self.chunks: list[dict[str, Any]] = []
        self.end: tuple[RequestStatus, str] | None = None
        self.cancel_reason: str | None = None
        self.wake = asyncio.Event()  # a chunk or the end
        self.done = asyncio.Event()  # the end

    def on_chunk(self, chunk: dict[str, Any]) -> None:
        self.chunks.append(chunk)
        self.wake.set()

    def take(self) -> list[dict[str, Any]]:
        chunks, self.chunks = self.chunks, []
        self.wake.clear()
        return chunks


def _sse(payload: Any) -> str:
    return f"data: {orjson.dumps(payload).decode()}\n\n"


_HTTP_STATUS = re.compile(r"HTTP (4\d\d)\b")


def _failure_error(status: RequestStatus, reason: str) -> ApiError:
    """The error a client gets for a request that ended before its first token."""
    category = reason_category(status, reason)
    if status is RequestStatus.REJECTED and category == "quota":  # the client's to slow down
        return ApiError(429, reason, code="quota_exceeded", type_="rate_limit_error")
    if status is RequestStatus.REJECTED:
        return ApiError(503, f"rejected: {reason}", code=category, type_="server_error")
    if status is RequestStatus.CANCELLED:
        return ApiError(503, f"cancelled: {reason}", code=category, type_="server_error")
    engine_status = _HTTP_STATUS.search(reason)
    if engine_status is not None:  # the engine refused the request itself
        return ApiError(int(engine_status.group(1)), reason, code="engine_rejected")
    code = 504 if category in ("queue_timeout", "handoff_timeout") else 502
    return ApiError(code, f"failed: {reason}", code=category, type_="server_error")


class Gateway:
    """Serves OpenAI requests through ``manager``; its backend must serve clients (have
    ``client_streams``: the simulated and the HTTP backends do)."""

    def __init__(self, manager: Any, settings: ServerSettings | None = None) -> None:
        self.manager = manager
        self.settings = settings or ServerSettings()
        streams = getattr(manager.backend, "client_streams", None)
        if streams is None:
            raise ValueError(
                f"backend {manager.backend.name!r} cannot serve clients (it has no "
                "client_streams); serve over backend=sim or backend=vllm_http"
            )
        self.streams: dict[str, ClientStream] = streams
        self.metrics = GatewayMetrics(manager)
        self.limiter = Limiter(Limit(**self.settings.per_key), Limit(**self.settings.per_user))
        self.api_keys = self.settings.keys()
        self.admin_keys = self.settings.admin()
        self.closing = False
        self._shutdown: asyncio.Task[None] | None = None
        self._clients: dict[str, _Client] = {}
        #: What runs beside the manager (an engine supervisor): objects with async
        #: ``start()`` and ``stop()``, started after the manager and stopped before it.
        self.services: list[Any] = []
        manager.core.terminal_listeners.append(self._on_terminal)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.manager.start()
        for service in self.services:
            await service.start()
        if not self.api_keys:
            log.warning("no API key configured (server.api_keys, $CPSIM_API_KEYS): "
                        "the API is open to anyone who can reach it")
        if not self.admin_keys:
            log.warning("no admin key configured (server.admin_keys, $CPSIM_ADMIN_KEYS): "
                        "the admin API is off")

    async def stop(self) -> None:
        """Cancel what is still in flight (reason ``shutdown``) and stop the manager."""
        self.closing = True
        for service in reversed(self.services):
            await service.stop()
        await self._cancel_in_flight()
        await self.manager.stop()

    def begin_shutdown(self) -> None:
        """SIGTERM: take no new request; what is in flight may finish for
        ``shutdown_grace_s``, then it is cancelled (reason ``shutdown``) so that each client
        gets an answer (a stream its error event) before the server closes. Call from the
        loop's thread."""
        if self.closing:
            return
        self.closing = True
        log.info("shutting down: in-flight requests have %.1f s to finish",
                 self.settings.shutdown_grace_s)

        async def cancel_after_grace() -> None:
            await asyncio.sleep(self.settings.shutdown_grace_s)
            await self._cancel_in_flight()

        self._shutdown = asyncio.get_running_loop().create_task(cancel_after_grace())

    async def _cancel_in_flight(self) -> None:
        for rid, client in list(self._clients.items()):
            if client.end is None and self.manager.core.status(rid) is not None:
                client.cancel_reason = "shutdown"
                await self.manager.cancel_request(rid)

    # ------------------------------------------------------------------ models
    def models(self) -> dict[str, int | None]:
        """The models the registered instances serve (and their LoRA adapters), each with
        its context limit."""
        out: dict[str, int | None] = {}
        for inst in self.manager.get_instances():
            limit = self.settings.max_model_len.get(inst.model_name)
            if limit is None and inst.metadata.get("max_model_len") is not None:
                limit = int(inst.metadata["max_model_len"])
            for name in (inst.model_name, *inst.lora_adapters):
                if name not in out or limit is not None:
                    out[name] = limit
        return out

    def adapter_parents(self) -> dict[str, str]:
        """Each LoRA adapter the instances serve -> its base model."""
        return {
            adapter: inst.model_name
            for inst in self.manager.get_instances()
            for adapter in inst.lora_adapters
        }

    # ------------------------------------------------------------------ auth
    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def authenticate(self, request: Request) -> str | None:
        """The caller's API key (None: the API is open); else an ApiError 401."""
        key = self._bearer(request)
        if not self.api_keys:
            return key
        if key is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type_="authentication_error")
        if key not in self.api_keys and key not in self.admin_keys:
            raise ApiError(401, "invalid API key", code="invalid_api_key",
                           type_="authentication_error")
        return key

    def authenticate_admin(self, request: Request) -> None:
        if not self.admin_keys:
            raise ApiError(403, "the admin API is off: no admin key is configured "
                           "(server.admin_keys or $CPSIM_ADMIN_KEYS)",
                           code="admin_disabled", type_="permission_error")
        if self._bearer(request) not in self.admin_keys:
            raise ApiError(401, "an admin key is required: 'Authorization: Bearer <admin key>'",
                           code="invalid_api_key", type_="authentication_error")

    # ------------------------------------------------------------------ requests
    async def serve(self, request: Request, api: Api) -> Response:
        """One OpenAI request, to its end: an error, a JSON answer or an SSE stream."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", type_="server_error")
        key = self.authenticate(request)
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", param="body",
                           code="invalid_json") from None
        parsed = parse_request(
            api, body, request.headers, self.models(), self.settings.default_max_tokens
        )
        try:
            admitted = self.limiter.admit(
                key, parsed.user, parsed.num_prompt_tokens + parsed.max_tokens
            )
        except Refused as over:
            self.metrics.rate_limited.labels(over.limit).inc()
            raise ApiError(429, str(over), code="rate_limit_exceeded", type_="rate_limit_error",
                           headers={"Retry-After": over.retry_after_header}) from None
        except ValueError as exc:
            raise ApiError(400, str(exc), param="max_tokens") from None
        prefix = "chatcmpl-" if api == "chat.completions" else "cmpl-"
        rid = prefix + uuid.uuid4().hex
        client = _Client(parsed, admitted)
        self._clients[rid] = client
        self.streams[rid] = ClientStream(api, parsed.upstream_body, client.on_chunk)
        try:
            await self.manager.submit_request(self._metadata(rid, parsed))
        except BaseException:
            self._forget(rid)
            raise
        return await self._answer(request, rid, client)

    @staticmethod
    def _metadata(rid: str, parsed: ParsedRequest) -> RequestMetadata:
        return RequestMetadata(
            request_id=rid,
            user_id=parsed.user,
            priority=parsed.priority,
            slo_deadline_ms=parsed.slo_deadline_ms,
            max_tokens=parsed.max_tokens,
            model_name=parsed.model,
            cost_budget=parsed.cost_budget,
            prompt_token_ids=parsed.prompt_token_ids,
            num_prompt_tokens=parsed.num_prompt_tokens,
            prefix_block_ids=parsed.prefix_block_ids or None,
            prefix_block_size_tokens=PREFIX_BLOCK_TOKENS,
        )

    async def _answer(self, request: Request, rid: str, client: _Client) -> Response:
        streaming = False
        try:
            # wait for the first chunk or the end, watching for the client leaving
            event = client.wake if client.parsed.stream else client.done
            if not await self._wait(event, request):
                return Response(status_code=499)  # the client left; nobody reads this
            end = client.end
            failed = end is not None and end[0] is not RequestStatus.COMPLETED
            # an answer cut short is an error (a stream that has begun ends with an event)
            if failed and (not client.chunks or not client.parsed.stream):
                assert end is not None
                raise _failure_error(*end)
            if not client.parsed.stream:
                answer = orjson.dumps(assemble(client.take(), rid, client.parsed))
                return Response(answer, media_type="application/json")
            streaming = True
            return StreamingResponse(
                self._events(rid, client),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": rid},
            )
        finally:
            if not streaming:
                await self._end(rid, client, "client_disconnect")

    async def _wait(self, event: asyncio.Event, request: Request) -> bool:
        """Wait for ``event``; False if the client disconnected first."""
        if event.is_set():
            return True
        waiter = asyncio.ensure_future(event.wait())
        gone = asyncio.ensure_future(self._disconnected(request))
        try:
            done, _ = await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            gone.cancel()
        return waiter in done

    @staticmethod
    async def _disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _events(self, rid: str, client: _Client) -> AsyncIterator[str]:
        """The SSE stream: the engine's chunks as they come (all those waiting in one
        write), then ``[DONE]``, or an error event first if the request failed midway."""
        try:
            while True:
                out = []
                for chunk in client.take():
                    sent = client_chunk(chunk, rid, client.parsed)
                    if sent is not None:
                        out.append(_sse(sent))
                if client.end is not None and not client.chunks:
                    status, reason = client.end
                    if status is not RequestStatus.COMPLETED:
                        out.append(_sse(_failure_error(status, reason).body()))
                    out.append("data: [DONE]\n\n")
                    yield "".join(out)
                    return
                if out:
                    yield "".join(out)
                await client.wake.wait()
        finally:  # ended, or the client left (the stream is cancelled)
            await self._end(rid, client, "client_disconnect")

    async def _end(self, rid: str, client: _Client, reason: str) -> None:
        """Cancel the request if it is still running (the engine is told to abort)."""
        if client.end is None and self.manager.core.status(rid) is not None:
            client.cancel_reason = reason
            await self.manager.cancel_request(rid)
        self._forget(rid)

    def _forget(self, rid: str) -> None:
        self._clients.pop(rid, None)
        self.streams.pop(rid, None)

    def _on_terminal(self, req: RequestState) -> None:
        rid = req.request_id
        client = self._clients.get(rid)
        label = None
        if client is not None:
            self.limiter.release(client.admitted)
            client.admitted = []
            label = client.cancel_reason
            client.end = (req.status, client.cancel_reason or req.reason)
            client.wake.set()
            client.done.set()
        self.streams.pop(rid, None)
        self.metrics.observe(req, label)

    # ------------------------------------------------------------------ admin
    def instances(self) -> list[dict[str, Any]]:
        out = []
        for inst in self.manager.get_instances():
            entry = {
                "instance_id": inst.instance_id,
                "model_name": inst.model_name,
                "endpoint": inst.endpoint,
                "instance_type": inst.instance_type.value,
                "tensor_parallel_size": inst.tensor_parallel_size,
                "draining": self.manager.core.is_draining(inst.instance_id),
            }
            entry.update(self.manager.get_instance_metrics(inst.instance_id))
            out.append(entry)
        return out

    def register(self, body: Any) -> ExecutionInstance:
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be an ExecutionInstance's fields as an object")
        allowed = {f.name for f in dataclasses.fields(ExecutionInstance)}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown instance fields {unknown}; allowed: {sorted(allowed)}",
                           param=unknown[0])
        try:
            instance = ExecutionInstance(**body)
            self.manager.register_instance(instance)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        return instance

    def set_policy(self, body: Any) -> dict[str, str]:
        if not isinstance(body, dict) or not set(body) <= {"scheduling_policy",
                                                          "routing_strategy"}:
            raise ApiError(400, "the body must be an object with scheduling_policy and/or "
                           "routing_strategy")
        try:
            if "scheduling_policy" in body:
                self.manager.update_policy(body["scheduling_policy"])
            if "routing_strategy" in body:
                self.manager.router.routing_strategy = body["routing_strategy"]
        except ValueError as exc:
            raise ApiError(400, str(exc), param=next(iter(body))) from None
        return self.policy()

    def policy(self) -> dict[str, str]:
        return {
            "scheduling_policy": self.manager.core.policy.name,
            "routing_strategy": self.manager.router.routing_strategy,
        }


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(
    gateway: Gateway, on_started: Callable[[], None] | None = None
) -> FastAPI:
    """The ASGI app. Its lifespan starts the manager (and its backend), then calls
    ``on_started``, and stops the manager at the end."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="cpsim gateway", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        gateway.metrics.http_errors.labels(str(error.status)).inc()
        return _error_response(error)

    async def completions(request: Request) -> Response:
        return await gateway.serve(request, "completions")

    async def chat_completions(request: Request) -> Response:
        return await gateway.serve(request, "chat.completions")

    # plain Starlette routes: they take the request as it is, without FastAPI's
    # per-request dependency solving (4-7 % less gateway CPU a request, benchmarks/README)
    app.router.add_route("/v1/completions", completions, methods=["POST"])
    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gateway.authenticate(request)
        created = int(time.time())
        parents = gateway.adapter_parents()  # as vLLM lists an adapter: its base as parent
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "cpsim",
                 "max_model_len": limit, "parent": parents.get(name)}
                for name, limit in sorted(gateway.models().items())
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        status = gateway.manager.get_status()
        ok = not gateway.closing and status["running"] and status["available_instances"] > 0
        body = {"ready": ok, "available_instances": status["available_instances"],
                "total_instances": status["total_instances"]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------- admin API
    @app.get("/admin/instances")
    async def list_instances(request: Request) -> list[dict[str, Any]]:
        gateway.authenticate_admin(request)
        return gateway.instances()

    @app.post("/admin/instances", status_code=201)
    async def register_instance(request: Request) -> dict[str, Any]:
        gateway.authenticate_admin(request)
        instance = gateway.register(await _json(request))
        return {"registered": instance.instance_id}

    @app.delete("/admin/instances/{instance_id}")
    async def unregister_instance(instance_id: str, request: Request) -> dict[str, Any]:
        gateway.authenticate_admin(request)
        _known(gateway, instance_id)
        gateway.manager.unregister_instance(instance_id)
        return {"unregistered": instance_id}

    @app.post("/admin/instances/{instance_id}/drain")
    async def drain_instance(
        instance_id: str, request: Request, timeout_s: float | None = None
    ) -> dict[str, Any]:
        gateway.authenticate_admin(request)
        _known(gateway, instance_id)
        limit = gateway.settings.drain_timeout_s if timeout_s is None else timeout_s
        emptied = await gateway.manager.drain_instance(instance_id, limit)
        return {"drained": instance_id, "emptied_in_time": emptied}

    @app.get("/admin/policy")
    async def get_policy(request: Request) -> dict[str, str]:
        gateway.authenticate_admin(request)
        return gateway.policy()

    @app.put("/admin/policy")
    async def put_policy(request: Request) -> dict[str, str]:
        gateway.authenticate_admin(request)
        return gateway.set_policy(await _json(request))

    @app.get("/admin/status")
    async def status(request: Request) -> dict[str, Any]:
        gateway.authenticate_admin(request)
        return dict(gateway.manager.get_status())

    @app.get("/admin/metrics")
    async def run_metrics(request: Request) -> dict[str, Any]:
        gateway.authenticate_admin(request)
        return dataclasses.asdict(gateway.manager.get_metrics())

    return app


async def _json(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", param="body") from None


def _known(gateway: Gateway, instance_id: str) -> None:
    ids: Mapping[str, Any] = {i.instance_id: i for i in gateway.manager.get_instances()}
    if instance_id not in ids:
        raise ApiError(404, f"instance_id={instance_id!r} is not registered; known: "
                       f"{sorted(ids) or 'none'}", param="instance_id", code="not_found")
