"""A stand-in for a vLLM OpenAI server: instant (or paced) tokens, for the gateway's tests and
its overhead benchmark where a real engine would measure the engine instead.

It speaks the part of vLLM's API the HTTP backend uses: ``/v1/completions`` and
``/v1/chat/completions`` (streamed with ``token_ids`` per chunk and a usage chunk, or whole),
``/health`` and ``/metrics``; it refuses an unknown model (404) and a ``temperature`` over 2
(400), as vLLM does. ``fail_all`` makes it answer every request with a 500 (a black hole);
``token_delay_s`` paces the tokens. ``requests`` keeps every body it was sent.

Its "model" is a counter, so that a request continued elsewhere (a migration by recompute:
prompt and output so far as the new prompt) goes on exactly where it stopped: the token
after one of its own (an id from ``FIRST_OUTPUT_ID`` on) is the next id, after any other
it is ``FIRST_OUTPUT_ID``; token ``FIRST_OUTPUT_ID + k`` reads " t{k}". A prompt given as
text counts one token per four characters (ids from its characters), chat messages one
per message. ``num_blocks`` (16 tokens each) is the KV cache it reports in
``vllm:cache_config_info`` and fills with its running requests' contexts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

FIRST_OUTPUT_ID = 50000
BLOCK_SIZE = 16


def prompt_ids(body: dict[str, Any]) -> list[int]:
    """The fake's tokens of a request's prompt (see the module)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    if prompt is None:  # chat: a token per message
        return [ord(str(m.get("content") or " ")[0]) for m in body.get("messages") or ()]
    text = str(prompt)
    return [ord(text[i]) for i in range(0, max(4, len(text)) - 3, 4)] if text else [0]


def next_id(last: int) -> int:
    return last + 1 if last >= FIRST_OUTPUT_ID else FIRST_OUTPUT_ID


class FakeEngine:
    def __init__(
        self, model: str = "tiny-llama", token_delay_s: float = 0.0, num_blocks: int = 1000
    ) -> None:
        self.model = model
        self.token_delay_s = token_delay_s
        self.num_blocks = num_blocks
        self.fail_all = False
        self.requests: list[dict[str, Any]] = []
        self.running = 0
        self.contexts: dict[int, int] = {}  # the running streams' context lengths
        self.app = self._build()

    @staticmethod
    def _error(status: int, message: str) -> JSONResponse:
        body = {"object": "error", "message": message, "type": "BadRequestError", "code": status}
        return JSONResponse(body, status_code=status)

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            name = self.model
            used = sum(-(-n // BLOCK_SIZE) for n in self.contexts.values()) / self.num_blocks
            return PlainTextResponse(
                f'vllm:num_requests_running{{model_name="{name}"}} {self.running}\n'
                f'vllm:num_requests_waiting{{model_name="{name}"}} 0\n'
                f'vllm:kv_cache_usage_perc{{model_name="{name}"}} {min(1.0, used)}\n'
                f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",'
                f'num_gpu_blocks="{self.num_blocks}"}} 1.0\n'
            )

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._serve(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._serve(request, chat=True)

        return app

    async def _serve(self, request: Request, chat: bool) -> Response:
        body = json.loads(await request.body())
        self.requests.append(body)
        if self.fail_all:
            return self._error(500, "engine failure (fail_all)")
        if body.get("model", self.model) != self.model:
            return self._error(404, f"The model `{body['model']}` does not exist.")
        if float(body.get("temperature") or 0.0) > 2.0:
            return self._error(400, f"temperature={body['temperature']} must be at most 2")
        n = int(body.get("max_tokens") or 16)
        rid = request.headers.get("x-request-id", "fake")
        if not body.get("stream"):
            return JSONResponse(self._whole(rid, chat, n, body))
        return StreamingResponse(self._stream(rid, chat, n, body), media_type="text/event-stream")

    def _chunk(
        self, rid: str, chat: bool, token: int, first: bool, finish: str | None
    ) -> dict[str, Any]:
        text = f" t{token - FIRST_OUTPUT_ID}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": [token]}
        if chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {
                "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice]}

    @staticmethod
    def _usage(body: dict[str, Any], n: int) -> dict[str, int]:
        prompt_tokens = len(prompt_ids(body))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                "total_tokens": prompt_tokens + n}

    async def _stream(
        self, rid: str, chat: bool, n: int, body: dict[str, Any]
    ) -> AsyncIterator[str]:
        self.running += 1
        prompt = prompt_ids(body)
        token, key = prompt[-1], id(body)
        try:
            for i in range(n):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                token = next_id(token)
                self.contexts[key] = len(prompt) + i + 1
                chunk = self._chunk(rid, chat, token, i == 0, "length" if i == n - 1 else None)
                if i == 0 and body.get("return_token_ids"):  # as vLLM: with the first chunk
                    if chat:
                        chunk["prompt_token_ids"] = prompt
                    else:
                        chunk["choices"][0]["prompt_token_ids"] = prompt
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"id": rid, "object": "text_completion", "created": int(time.time()),
                     "model": self.model, "choices": [], "usage": self._usage(body, n)}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        finally:
            self.running -= 1
            self.contexts.pop(key, None)

    def _whole(self, rid: str, chat: bool, n: int, body: dict[str, Any]) -> dict[str, Any]:
        ids, token = [], prompt_ids(body)[-1]
        for _ in range(n):
            token = next_id(token)
            ids.append(token)
        text = "".join(f" t{t - FIRST_OUTPUT_ID}" for t in ids)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "token_ids": ids}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        answer: dict[str, Any] = {
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model, "choices": [choice],
            "usage": self._usage(body, n),
        }  # fmt: skip
        if "kv_transfer_params" in body:
            answer["kv_transfer_params"] = {"remote": rid}
        return answer


def main() -> None:
    """``python -m experiments.fake_engine --port 8200``: serve a FakeEngine under uvicorn."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    args = parser.parse_args()
    engine = FakeEngine(args.model, args.token_delay_s)
    uvicorn.run(engine.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
