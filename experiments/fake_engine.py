"""A stand-in for a vLLM OpenAI server: instant (or paced) tokens, for the gateway's tests and
its overhead benchmark where a real engine would measure the engine instead.

It speaks the part of vLLM's API the HTTP backend uses: ``/v1/completions`` and
``/v1/chat/completions`` (streamed with ``token_ids`` per chunk and a usage chunk, or whole),
``/health`` and ``/metrics``; it refuses an unknown model (404) and a ``temperature`` over 2
(400), as vLLM does. ``fail_all`` makes it answer every request with a 500 (a black hole);
``token_delay_s`` paces the tokens. ``requests`` keeps every body it was sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse


class FakeEngine:
    def __init__(self, model: str = "tiny-llama", token_delay_s: float = 0.0) -> None:
        self.model = model
        self.token_delay_s = token_delay_s
        self.fail_all = False
        self.requests: list[dict[str, Any]] = []
        self.running = 0
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
            return PlainTextResponse(
                f'vllm:num_requests_running{{model_name="{name}"}} {self.running}\n'
                f'vllm:num_requests_waiting{{model_name="{name}"}} 0\n'
                f'vllm:kv_cache_usage_perc{{model_name="{name}"}} 0.0\n'
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

    def _chunk(self, rid: str, chat: bool, i: int, finish: str | None) -> dict[str, Any]:
        text = f" t{i}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": [i % 32000]}
        if chat:
            choice["delta"] = {"role": "assistant", "content": text} if i == 0 else {
                "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice]}

    @staticmethod
    def _usage(body: dict[str, Any], n: int) -> dict[str, int]:
        prompt = body.get("prompt") or body.get("messages") or ""
        prompt_tokens = len(prompt) if isinstance(prompt, list) else max(1, len(prompt) // 4)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                "total_tokens": prompt_tokens + n}

    async def _stream(
        self, rid: str, chat: bool, n: int, body: dict[str, Any]
    ) -> AsyncIterator[str]:
        self.running += 1
        try:
            for i in range(n):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                chunk = self._chunk(rid, chat, i, "length" if i == n - 1 else None)
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"id": rid, "object": "text_completion", "created": int(time.time()),
                     "model": self.model, "choices": [], "usage": self._usage(body, n)}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        finally:
            self.running -= 1

    def _whole(self, rid: str, chat: bool, n: int, body: dict[str, Any]) -> dict[str, Any]:
        text = "".join(f" t{i}" for i in range(n))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length",
                                  "token_ids": [i % 32000 for i in range(n)]}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        answer = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": self.model, "choices": [choice],
                  "usage": self._usage(body, n)}
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
