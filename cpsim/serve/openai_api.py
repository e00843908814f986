"""OpenAI requests in, control-plane requests out; and the answers, assembled from chunks.

``parse_request`` checks a client's body the way the OpenAI API does (an ``ApiError``
naming the field for anything wrong), takes out what is cpsim's (``priority``,
``slo_deadline_ms``, ``cost_budget``: body fields, or ``X-Cpsim-*`` headers, so that OpenAI
clients pass them with ``extra_body`` or ``extra_headers``) and gives the body the engine is
sent: streamed, with usage and token ids, whatever the client asked, so the control plane
counts tokens the same way for every client.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cpsim.streams import Api, openai_object
from cpsim.types import CHARS_PER_TOKEN_ESTIMATE, RequestPriority

#: cpsim's own request fields: read by the gateway, never sent to the engine.
CPSIM_FIELDS: Final = ("priority", "slo_deadline_ms", "cost_budget")
HEADER_PREFIX: Final = "x-cpsim-"
#: Tokens a prefix-hash block covers: chat turns share prefixes at this granularity.
PREFIX_BLOCK_TOKENS: Final = 64


class ApiError(Exception):
    """An error the client gets as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ParsedRequest:
    """A checked client request: what the control plane needs, and the engine's body."""

    api: Api
    model: str
    stream: bool
    include_usage: bool
    return_token_ids: bool
    max_tokens: int
    user: str
    priority: RequestPriority
    slo_deadline_ms: float | None
    cost_budget: float | None
    prompt_text: str | None
    prompt_token_ids: tuple[int, ...] | None
    num_prompt_tokens: int
    prefix_block_ids: tuple[int, ...]
    upstream_body: dict[str, Any]


def _bad(message: str, param: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int_field(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise _bad(f"{name}={value!r} must be an integer >= 1", name)
    return value


def _number(value: Any, name: str, minimum: float, inclusive: bool) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _bad(f"{name}={value!r} must be a number", name) from None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(f"{name}={value!r} must be a number", name)
    if value < minimum or (value == minimum and not inclusive):
        op = ">=" if inclusive else ">"
        raise _bad(f"{name}={value!r} must be {op} {minimum:g}", name)
    return float(value)


def _priority(value: Any) -> RequestPriority:
    names = ", ".join(p.name.lower() for p in RequestPriority)
    if isinstance(value, str) and value.strip().upper() in RequestPriority.__members__:
        return RequestPriority[value.strip().upper()]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if type(value) is int and 0 <= value <= 3:
        return RequestPriority(value)
    raise _bad(f"priority={value!r} is not one of: {names} (or 0-3, 0 most urgent)", "priority")


def _cpsim_field(body: Mapping[str, Any], headers: Mapping[str, str], name: str) -> Any:
    if body.get(name) is not None:
        return body[name]
    return headers.get(HEADER_PREFIX + name.replace("_", "-"))


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad(
            f"messages must be a non-empty array of messages, not {_type_name(messages)}",
            "messages",
        )
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones count
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict)
            )
        elif content is not None and not isinstance(content, str):
            raise _bad(
                f"messages[{i}].content must be a string or an array of parts, "
                f"not {_type_name(content)}",
                f"messages[{i}].content",
            )
        parts.append(f"{message['role']}: {content or ''}")
    return "\n".join(parts)


def _completion_prompt(prompt: Any) -> tuple[str | None, tuple[int, ...] | None]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
        return None, tuple(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad(
            f"prompt is a batch of {len(prompt)} prompts; send one request per prompt",
            "prompt",
            "unsupported_value",
        )
    raise _bad(
        f"prompt must be a string or an array of token ids, not {_type_name(prompt)}", "prompt"
    )


def prefix_blocks(text: str) -> tuple[int, ...]:
    """Ids of the prompt's prefix blocks: the i-th id stands for the text up to the end of
    block i, so equal ids at a position mean an equal prefix (as a trace's hash ids do);
    what prefix-cache-aware routing matches on."""
    size = PREFIX_BLOCK_TOKENS * CHARS_PER_TOKEN_ESTIMATE
    digest = hashlib.blake2b(digest_size=8)
    ids = []
    for end in range(size, len(text) + 1, size):
        digest.update(text[end - size : end].encode())
        ids.append(int.from_bytes(digest.copy().digest(), "big") >> 1)
    return tuple(ids)


def parse_request(
    api: Api,
    body: Any,
    headers: Mapping[str, str],
    models: Mapping[str, int | None],
    default_max_tokens: int,
) -> ParsedRequest:
    """Check a client's body. ``models``: the models served, each with its context limit
    (None: not known); ``headers`` with lower-case names."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, not {_type_name(body)}", "body")
    model = body.get("model")
    if model is None and len(models) == 1:
        model = next(iter(models))
    if not isinstance(model, str) or not model:
        raise _bad(f"model={model!r} must be the name of a served model", "model")
    if model not in models:
        served = ", ".join(sorted(models)) or "none (no instance is registered)"
        raise ApiError(
            404,
            f"The model {model!r} does not exist; served: {served}",
            param="model",
            code="model_not_found",
        )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if type(stream) is not bool:
        raise _bad(f"stream={stream!r} must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad(f"stream_options={options!r} must be an object", "stream_options")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise _bad(f"n={n!r} is not supported: cpsim serves one choice a request", "n")
    user = body.get("user", "anonymous")
    if not isinstance(user, str) or not user:
        raise _bad(f"user={user!r} must be a non-empty string", "user")

    prompt_text: str | None
    prompt_ids: tuple[int, ...] | None
    if api == "chat.completions":
        prompt_text, prompt_ids = _chat_text(body.get("messages")), None
        # chat turns carry a few tokens of framing each
        num_prompt = math.ceil(len(prompt_text) / CHARS_PER_TOKEN_ESTIMATE) + 4
        max_tokens = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens")
        token_field = (
            "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        )
    else:
        if "prompt" not in body:
            raise _bad("prompt is required", "prompt", "missing")
        prompt_text, prompt_ids = _completion_prompt(body["prompt"])
        num_prompt = (
            len(prompt_ids)
            if prompt_ids is not None
            else max(1, math.ceil(len(prompt_text or "") / CHARS_PER_TOKEN_ESTIMATE))
        )
        max_tokens = _int_field(body, "max_tokens")
        token_field = "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    limit = models[model]
    if limit is not None and max_tokens > limit:
        raise _bad(
            f"{token_field}={max_tokens} is more than model {model!r} allows "
            f"(max_model_len={limit})",
            token_field,
        )
    priority = _cpsim_field(body, headers, "priority")
    slo = _cpsim_field(body, headers, "slo_deadline_ms")
    budget = _cpsim_field(body, headers, "cost_budget")

    upstream = {k: v for k, v in body.items() if k not in CPSIM_FIELDS}
    upstream.pop("max_completion_tokens", None)
    upstream.update(
        model=model,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        return_token_ids=True,
    )
    return ParsedRequest(
        api=api,
        model=model,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        return_token_ids=bool(body.get("return_token_ids", False)),
        max_tokens=max_tokens,
        user=user,
        priority=RequestPriority.NORMAL if priority is None else _priority(priority),
        slo_deadline_ms=None if slo is None else _number(slo, "slo_deadline_ms", 0, False),
        cost_budget=None if budget is None else _number(budget, "cost_budget", 0, True),
        prompt_text=prompt_text,
        prompt_token_ids=prompt_ids,
        num_prompt_tokens=num_prompt,
        prefix_block_ids=prefix_blocks(prompt_text) if prompt_text else (),
        upstream_body=upstream,
    )


def client_chunk(
    chunk: dict[str, Any], request_id: str, parsed: ParsedRequest
) -> dict[str, Any] | None:
    """An engine's chunk as the client gets it: the gateway's id and the model it asked
    for; token ids only if it asked for them; the usage chunk only if it asked for it.
    None: nothing to send."""
    out = dict(chunk)
    out["id"] = request_id
    out["model"] = parsed.model
    choices = out.get("choices") or []
    if not choices:
        return out if parsed.include_usage and out.get("usage") else None
    if not parsed.include_usage:
        out.pop("usage", None)
    if not parsed.return_token_ids:
        out.pop("prompt_token_ids", None)
        out["choices"] = [
            {k: v for k, v in c.items() if k != "token_ids"} if "token_ids" in c else c
            for c in choices
        ]
    return out


def assemble(
    chunks: list[dict[str, Any]], request_id: str, parsed: ParsedRequest
) -> dict[str, Any]:
    """The non-streaming answer, from the chunks of the stream the engine sent: the text
    (or message), the finish reason and the usage."""
    text: list[str] = []
    finish: str | None = None
    usage: dict[str, Any] | None = None
    token_ids: list[int] = []
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if parsed.api == "chat.completions":
                text.append((choice.get("delta") or {}).get("content") or "")
            else:
                text.append(choice.get("text") or "")
            token_ids += choice.get("token_ids") or []
            finish = choice.get("finish_reason") or finish
    choice_out: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if parsed.api == "chat.completions":
        choice_out["message"] = {"role": "assistant", "content": "".join(text)}
        obj = "chat.completion"
    else:
        choice_out["text"] = "".join(text)
        obj = "text_completion"
    if parsed.return_token_ids:
        choice_out["token_ids"] = token_ids
    return openai_object(request_id, obj, parsed.model, [choice_out], usage=usage)
