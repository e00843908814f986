"""Requests a front end serves for a client: what the client sent, and where output goes.

The OpenAI gateway (``cpsim.serve``) registers a ``ClientStream`` with the backend under the
request's id before submitting it. A backend that serves clients (it has a
``client_streams`` dict) sends the client's body to the engine it dispatches to, a real
one, or writes text of its own, a simulated one, and hands every OpenAI streaming chunk to
``on_chunk``; the control plane still hears token counts through the engine events, so
scheduling, routing and metrics do not depend on who sent the request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

Api = Literal["completions", "chat.completions"]

#: The words a simulated engine "generates", one per output token.
_WORDS: Final = (
    " the", " control", " plane", " routes", " each", " request", " to", " an",
    " engine", " that", " has", " room", " for", " it", " and", " streams", " back",
    " its", " tokens", ".",
)


@dataclass(slots=True)
class ClientStream:
    """A client's request in flight. ``api``: which OpenAI endpoint it came in on;
    ``body``: the JSON body to send the engine (the gateway has taken its own fields out);
    ``on_chunk``: called with each chunk in OpenAI's streaming format, in order."""

    api: Api
    body: dict[str, Any]
    on_chunk: Callable[[dict[str, Any]], None]

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))


def openai_object(
    request_id: str, obj: str, model: str, choices: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """An OpenAI answer or streaming chunk: its envelope around ``choices``, then
    ``fields`` (``usage``)."""
    return {
        "id": request_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **fields,
    }


def synthetic_text(start: int, num_tokens: int) -> str:
    """``num_tokens`` words of a simulated engine's output, from token ``start`` on."""
    return "".join(_WORDS[(start + i) % len(_WORDS)] for i in range(num_tokens))


def text_chunk(
    stream: ClientStream,
    request_id: str,
    text: str,
    finish_reason: str | None = None,
    first: bool = False,
) -> dict[str, Any]:
    """A streaming chunk carrying ``text`` (a chat delta, the ``first`` with the role, or a
    completion's text)."""
    choice: dict[str, Any]
    if stream.api == "chat.completions":
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return openai_object(request_id, obj, stream.model, [choice])


def usage_chunk(
    stream: ClientStream, request_id: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last chunk of a stream whose client asked for usage: no choices, the counts."""
    obj = "chat.completion.chunk" if stream.api == "chat.completions" else "text_completion"
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return openai_object(request_id, obj, stream.model, [], usage=usage)
