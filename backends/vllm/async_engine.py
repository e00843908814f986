"""In-process vLLM backend ("vllm_async"): one vLLM v1 AsyncLLM engine per registered instance.

Constructor (stable; the profiler and the fidelity report build it)::

    AsyncLLMBackend(engine_args=None, model_dir=TINY_MODEL_DIR, env=None,
                    scrape_interval_s=0.5, engines=None)

- ``engine_args``: AsyncEngineArgs fields over the defaults of the tiny dummy-weight Llama
  (``engine_args.DEFAULT_ENGINE_ARGS``: load_format dummy, skip_tokenizer_init,
  gpu_memory_utilization 0.3, enforce_eager, max_model_len 2048); ``model`` defaults to
  ``model_dir`` (a path, or a folder name under conf/vllm_model/).
- ``env``: environment of the engine processes over ``DEFAULT_ENV``
  (VLLM_CPU_KVCACHE_SPACE=1, HF_HUB_OFFLINE=1).
- Per instance, its sequence limit (``engine_args.instance_engine_args``: the seed's
  ``target_batch_size`` / ``max_parallel_requests``) overrides ``engine_args``, and
  ``instance.metadata["engine_args"]`` and ``instance.metadata["env"]`` override both.
  ``add_instance`` starts the engine and returns when it is ready (20-35 s on a CPU; the
  manager runs it in the background).
- ``engines``: already started ``LocalEngine`` objects by instance id (``start_local_engine``);
  the backend serves them but does not shut them down (tests share one engine this way).
- ``local_engine(instance_id)`` gives the engine, its ``EngineStats`` and its arguments.

Each dispatch is an asyncio task streaming ``engine.generate`` (DELTA outputs, ignore_eos,
no detokenization); tokens are counted by ``len(token_ids)`` per output. A PREFILL dispatch
runs one token with ``kv_transfer_params={"do_remote_decode": True}`` and reports
``on_prefill_done``; the DECODE dispatch that follows sends the params the prefill returned
(engines need a KV connector, e.g. ExampleConnector, for the KV cache to move).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends.vllm.engine_args import TINY_MODEL_DIR, instance_engine_args
from backends.vllm.local_engine import LocalEngine, start_local_engine
from backends.vllm.pd import PREFILL_KV_PARAMS, HandoffStore
from backends.vllm.prompts import prompt_token_ids
from cpsim.backend import Clock, EngineEvents, check_started
from cpsim.core import Abort, Dispatch
from cpsim.types import ExecutionInstance
from cpsim.validation import check_positive
from cpsim.views import Phase


class AsyncLLMBackend:
    """Backend of in-process vLLM engines; see the module docstring."""

    name = "vllm_async"

    def __init__(
        self,
        engine_args: Mapping[str, Any] | None = None,
        model_dir: str | Path = TINY_MODEL_DIR,
        env: Mapping[str, str] | None = None,
        scrape_interval_s: float = 0.5,
        engines: Mapping[str, LocalEngine] | None = None,
    ) -> None:
        check_positive("scrape_interval_s", scrape_interval_s)
        self.engine_args = {"model": str(model_dir), **dict(engine_args or {})}
        self.env = dict(env or {})
        self.scrape_interval_s = scrape_interval_s
        self._adopted = dict(engines or {})
        self._engines: dict[str, LocalEngine] = {}
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._handoffs = HandoffStore()
        self._dead: set[str] = set()
        self._aborts: set[asyncio.Task[None]] = set()
        self._events: EngineEvents | None = None
        self._clock: Clock = lambda: 0.0
        self._scraper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ Backend
    async def start(self, events: EngineEvents, clock: Clock) -> None:
        self._events, self._clock = events, clock
        self._scraper = asyncio.create_task(self._scrape_loop())

    async def stop(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        if self._scraper is not None:
            tasks.append(self._scraper)
            self._scraper = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        owned = [e for e in self._engines.values() if e.owned]
        self._engines.clear()
        await asyncio.gather(*(e.shutdown() for e in owned))

    async def add_instance(self, instance: ExecutionInstance) -> bool:
        iid = instance.instance_id
        check_started(self, self._events, iid)
        if iid in self._engines:
            raise ValueError(f"instance_id={iid!r} already has an engine")
        adopted = self._adopted.get(iid)
        if adopted is not None:
            adopted.owned = False
            self._engines[iid] = adopted
            return True
        args = {
            **self.engine_args,
            **instance_engine_args(instance),
            **dict(instance.metadata.get("engine_args") or {}),
        }
        env = {**self.env, **dict(instance.metadata.get("env") or {})}
        self._engines[iid] = await start_local_engine(args, env)
        return True

    async def remove_instance(self, instance_id: str) -> None:
        for rid, (iid, task) in list(self._tasks.items()):
            if iid == instance_id:
                task.cancel()
                del self._tasks[rid]
        engine = self._engines.pop(instance_id, None)
        self._dead.discard(instance_id)
        if engine is not None and engine.owned:
            await engine.shutdown()

    def dispatch(self, dispatch: Dispatch) -> None:
        engine = self.local_engine(dispatch.instance_id)
        task = asyncio.create_task(self._serve(dispatch, engine))
        self._tasks[dispatch.request_id] = (dispatch.instance_id, task)

    def abort(self, abort: Abort) -> None:
        """Cancel the request's stream task (vLLM aborts a request whose ``generate`` is
        cancelled) and tell the engine to abort the id; nothing more is reported for it."""
        entry = self._tasks.pop(abort.request_id, None)
        if entry is not None:
            entry[1].cancel()
        self._handoffs.pop(abort.request_id)
        engine = self._engines.get(abort.instance_id)
        if engine is not None and not engine.errored:
            task = asyncio.create_task(engine.engine.abort(abort.request_id))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    # ------------------------------------------------------------------ introspection
    def local_engine(self, instance_id: str) -> LocalEngine:
        engine = self._engines.get(instance_id)
        if engine is None:
            known = ", ".join(self._engines) or "none"
            raise ValueError(f"instance_id={instance_id!r} has no engine; known: {known}")
        return engine

    def in_flight(self, instance_id: str) -> int:
        return sum(1 for iid, _ in self._tasks.values() if iid == instance_id)

    # ------------------------------------------------------------------ serving
    def _sampling_params(self, d: Dispatch) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] | None = None
        max_tokens = d.request.max_tokens
        if d.phase is Phase.PREFILL:
            max_tokens = 1
            extra = {"kv_transfer_params": dict(PREFILL_KV_PARAMS)}
        elif d.phase is Phase.DECODE:
            params = self._handoffs.pop(d.request_id)
            if params:
                extra = {"kv_transfer_params": params}
        return SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )

    async def _serve(self, d: Dispatch, engine: LocalEngine) -> None:
        from vllm.inputs import TokensPrompt

        events, rid, iid = self._events, d.request_id, d.instance_id
        assert events is not None
        num_tokens = 0
        try:
            prompt = TokensPrompt(prompt_token_ids=prompt_token_ids(d.request, engine.vocab_size))
            params = self._sampling_params(d)
            async for out in engine.engine.generate(prompt, params, request_id=rid):
                now = self._clock()
                k = len(out.outputs[0].token_ids) if out.outputs else 0
                if d.phase is not Phase.PREFILL and k:
                    if num_tokens == 0:
                        events.on_first_token(rid, iid, now)
                        if k > 1:
                            events.on_tokens(rid, iid, k - 1, now)
                    else:
                        events.on_tokens(rid, iid, k, now)
                    num_tokens += k
                if out.finished:
                    self._tasks.pop(rid, None)
                    self._report_end(d, out, num_tokens, now)
                    return
            self._tasks.pop(rid, None)
            events.on_failure(rid, iid, f"engine {iid}: stream ended early", self._clock())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._tasks.pop(rid, None)
            self._report_error(d, engine, exc, num_tokens)

    def _report_end(self, d: Dispatch, out: Any, num_tokens: int, now: float) -> None:
        events, rid, iid = self._events, d.request_id, d.instance_id
        assert events is not None
        reason = out.outputs[0].finish_reason if out.outputs else None
        if reason == "abort":  # aborted by the engine, not by us (we report nothing then)
            events.on_failure(rid, iid, f"engine {iid} aborted it", now, num_tokens == 0)
            return
        if d.phase is Phase.PREFILL:
            self._handoffs.put(rid, out.kv_transfer_params)
            events.on_prefill_done(rid, iid, now)
            return
        metrics = getattr(out, "metrics", None)
        extras = {
            "num_prefix_hit_tokens": float(out.num_cached_tokens or 0),
            "num_preemptions": float(getattr(metrics, "num_preemptions", 0) or 0),
        }
        events.on_finish(rid, iid, num_tokens, now, extras)

    def _report_error(self, d: Dispatch, engine: LocalEngine, exc: Exception, n: int) -> None:
        events, rid, iid = self._events, d.request_id, d.instance_id
        assert events is not None
        now = self._clock()
        reason = f"engine {iid}: {type(exc).__name__}: {exc}"
        if engine.errored:
            self._mark_dead(iid, reason)
        invalid = isinstance(exc, ValueError | TypeError)  # e.g. VLLMValidationError
        events.on_failure(
            rid, iid, reason, now, retryable=n == 0 and not invalid, instance_fault=not invalid
        )

    def _mark_dead(self, instance_id: str, reason: str) -> None:
        if instance_id in self._dead or self._events is None:
            return
        self._dead.add(instance_id)
        self._events.on_instance_failure(instance_id, reason, self._clock())

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scrape_interval_s)
            assert self._events is not None
            now = self._clock()
            for iid, engine in list(self._engines.items()):
                if engine.errored:
                    self._mark_dead(iid, "engine errored")
                snap = engine.stats.snapshot(iid, now, healthy=not engine.errored)
                self._events.on_snapshot(snap, now)
