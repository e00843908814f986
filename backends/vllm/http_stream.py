"""One /v1/completions call to a vLLM OpenAI server: a token stream, or a one-token prefill."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import aiohttp
import orjson


class StreamBroken(Exception):
    """The connection failed or closed before ``[DONE]`` (server or network gone)."""


class StreamTimeout(Exception):
    """No first token, or no next chunk, within its timeout."""


class ServerError(Exception):
    """The server answered with an error status or an error event."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Client errors (4xx but 408/429) would fail on any instance; the rest may not."""
        return not (400 <= self.status < 500 and self.status not in (408, 429))


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    connect_s: float
    first_token_s: float
    idle_s: float


@dataclass(frozen=True, slots=True)
class StreamResult:
    num_tokens: int
    finish_reason: str | None
    usage_completion_tokens: int | None
    kv_transfer_params: dict[str, Any] | None = None


def completion_body(
    prompt_ids: list[int], max_tokens: int, stream: bool, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The request body: prompt as token ids, exactly ``max_tokens`` tokens (ignore_eos),
    token ids in every chunk and the usage in the last one."""
    body: dict[str, Any] = {
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    return body


def _num_tokens(choice: Mapping[str, Any]) -> int:
    ids = choice.get("token_ids")
    if ids is not None:
        return len(ids)
    delta = choice.get("delta")
    text = choice.get("text") if delta is None else delta.get("content")
    return 1 if text else 0


@cache
def _client_timeout(t: StreamTimeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=t.connect_s, sock_connect=t.connect_s)


async def _check_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status != 200:
        text = (await resp.text())[:300]
        raise ServerError(f"HTTP {resp.status}: {text}", resp.status)


#: Responses read to their end in the background (a strong reference until done).
_ENDING: set[asyncio.Task[None]] = set()


def _release_when_ended(resp: aiohttp.ClientResponse) -> None:
    """Give a response's connection back for the next request once its body has ended (the
    chunk that closes it comes with ``[DONE]`` or just after). aiohttp closes the
    connection of a response released before its end, and a new TCP connection per request
    cost the relay a tenth of its CPU. Read in the background when it is not there yet, so
    the request's end does not wait for it."""
    if resp.content.at_eof():
        resp.release()
        return
    task = asyncio.get_running_loop().create_task(_read_to_end(resp))
    _ENDING.add(task)
    task.add_done_callback(_ENDING.discard)


async def _read_to_end(resp: aiohttp.ClientResponse, wait_s: float = 1.0) -> None:
    try:
        async with asyncio.timeout(wait_s):
            while await resp.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        resp.close()  # a server that keeps the response open loses the connection
        return
    resp.release()


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    timeouts: StreamTimeouts,
    on_tokens: Callable[[int], None],
    on_chunk: Callable[[dict[str, Any]], None] | None = None,
) -> StreamResult:
    """POST a streaming completion (or chat completion) and call ``on_tokens(k)`` with the
    k > 0 new tokens (a chunk's ``token_ids``, else one for a chunk with text) of each read
    from the socket, after ``on_chunk(chunk)`` for each chunk when given. Returns at
    ``[DONE]``. Cancelling the caller closes the connection, which makes vLLM abort the
    request."""
    loop = asyncio.get_running_loop()
    num, reported, finish, usage = 0, 0, None, None
    try:
        async with asyncio.timeout_at(loop.time() + timeouts.first_token_s) as deadline:
            resp = await session.post(
                url, json=dict(body), headers=dict(headers), timeout=_client_timeout(timeouts)
            )
            try:
                await _check_status(resp)
                # whatever has arrived at once, every chunk in it, with one token report and
                # one deadline move per read rather than per chunk
                pending = b""
                while True:
                    block = await resp.content.readany()
                    if not block:
                        raise StreamBroken(f"stream closed after {num} tokens, no [DONE]")
                    *lines, pending = (pending + block).split(b"\n")
                    for line in lines:
                        data = line.strip()
                        if not data.startswith(b"data:"):
                            continue
                        data = data[5:].strip()
                        if data == b"[DONE]":
                            if num > reported:
                                on_tokens(num - reported)
                            _release_when_ended(resp)
                            return StreamResult(num, finish, usage)
                        chunk = orjson.loads(data)  # ~4x json's speed: 17 chunks a request
                        error = chunk.get("error")
                        if error:
                            code = error.get("code") if isinstance(error, dict) else None
                            raise ServerError(f"error event: {error}", int(code or 500))
                        if on_chunk is not None:
                            on_chunk(chunk)
                        for choice in chunk.get("choices") or []:
                            num += _num_tokens(choice)
                            finish = choice.get("finish_reason") or finish
                        if chunk.get("usage") and not chunk.get("choices"):
                            usage = int(chunk["usage"].get("completion_tokens") or 0)
                    if num > reported:
                        on_tokens(num - reported)
                        reported = num
                        deadline.reschedule(loop.time() + timeouts.idle_s)
            except BaseException:
                resp.close()  # cancelled or failed: the server sees the client go (vLLM aborts)
                raise
    except TimeoutError as exc:
        what = "first token" if num == 0 else "next chunk"
        limit = timeouts.first_token_s if num == 0 else timeouts.idle_s
        raise StreamTimeout(f"no {what} within {limit} s (after {num} tokens)") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise StreamBroken(f"{type(exc).__name__}: {exc} (after {num} tokens)") from exc


async def prefill_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    timeouts: StreamTimeouts,
) -> StreamResult:
    """POST a non-streaming completion (the one-token prefill of a PD hand-off); its
    response carries the ``kv_transfer_params`` for the decode engine."""
    try:
        async with (
            asyncio.timeout(timeouts.first_token_s),
            session.post(
                url, json=dict(body), headers=dict(headers), timeout=_client_timeout(timeouts)
            ) as resp,
        ):
            await _check_status(resp)
            answer = await resp.json(content_type=None)
    except TimeoutError as exc:
        raise StreamTimeout(f"no prefill answer within {timeouts.first_token_s} s") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise StreamBroken(f"{type(exc).__name__}: {exc}") from exc
    choices = answer.get("choices") or [{}]
    usage = (answer.get("usage") or {}).get("completion_tokens")
    return StreamResult(
        len(choices[0].get("token_ids") or ()),
        choices[0].get("finish_reason"),
        None if usage is None else int(usage),
        answer.get("kv_transfer_params"),
    )
