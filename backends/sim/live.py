"""Simulated vLLM replicas in wall time: the ControlPlaneManager's default backend.

The same replica processes as the virtual-time simulation run in a SimPy environment whose
time is the manager's clock (simulated seconds: the manager scales wall time by
``time_scale``), advanced by an asyncio task; only the driver's clock differs, never a
policy or the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Mapping
from typing import Any

import simpy

from backends.sim.cluster import KVLink, handoff_s, sim_request_for
from backends.sim.handoff import KVTransfers
from backends.sim.kv_capacity import num_kv_blocks
from backends.sim.process import ReplicaProcess, TokenReports
from backends.sim.replica import ReplicaConfig, SimReplica
from cpsim.backend import Clock, EngineEvents, check_started
from cpsim.core import Abort, Dispatch
from cpsim.datafiles import data_names
from cpsim.latency import StepLatencyModel
from cpsim.models import ModelSpec, load_model_spec
from cpsim.pricing import latency_for
from cpsim.streams import ClientStream, synthetic_text, text_chunk, usage_chunk
from cpsim.types import ExecutionInstance
from cpsim.validation import check_choice, check_positive
from cpsim.views import InstanceSnapshot, Phase


class _Replica:
    __slots__ = ("config", "model", "proc")

    def __init__(self, proc: ReplicaProcess, config: ReplicaConfig, model: ModelSpec) -> None:
        self.proc, self.config, self.model = proc, config, model


class _ClientEvents:
    """The replicas' engine events, passed on; for a request a client waits for
    (``client_streams``), each token also becomes text: the simulated engine's output."""

    def __init__(self, events: EngineEvents, streams: dict[str, ClientStream]) -> None:
        self.events = events
        self.streams = streams
        self.sent: dict[str, int] = {}  # tokens written per streamed request
        self.prompt_tokens: dict[str, int] = {}

    def _write(self, request_id: str, num_tokens: int) -> None:
        stream = self.streams.get(request_id)
        if stream is not None and num_tokens > 0:
            start = self.sent.get(request_id, 0)
            self.sent[request_id] = start + num_tokens
            text = synthetic_text(start, num_tokens)
            stream.on_chunk(text_chunk(stream, request_id, text, first=start == 0))

    def on_first_token(self, request_id: str, instance_id: str, now: float) -> None:
        self._write(request_id, 1)
        self.events.on_first_token(request_id, instance_id, now)

    def on_tokens(self, request_id: str, instance_id: str, num_tokens: int, now: float) -> None:
        self._write(request_id, num_tokens)
        self.events.on_tokens(request_id, instance_id, num_tokens, now)

    def on_prefill_done(self, request_id: str, instance_id: str, now: float) -> None:
        self.events.on_prefill_done(request_id, instance_id, now)

    def on_finish(
        self,
        request_id: str,
        instance_id: str,
        num_output_tokens: int,
        now: float,
        extras: Mapping[str, float] | None = None,
    ) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            self._write(request_id, num_output_tokens - self.sent.get(request_id, 0))
            stream.on_chunk(text_chunk(stream, request_id, "", finish_reason="length"))
            prompt = self.prompt_tokens.get(request_id, 0)
            stream.on_chunk(usage_chunk(stream, request_id, prompt, num_output_tokens))
        self.forget(request_id)
        self.events.on_finish(request_id, instance_id, num_output_tokens, now, extras)

    def on_failure(
        self,
        request_id: str,
        instance_id: str,
        reason: str,
        now: float,
        retryable: bool = True,
        instance_fault: bool = True,
    ) -> None:
        self.events.on_failure(request_id, instance_id, reason, now, retryable, instance_fault)

    def on_instance_failure(self, instance_id: str, reason: str, now: float) -> None:
        self.events.on_instance_failure(instance_id, reason, now)

    def on_instance_recovered(self, instance_id: str, now: float) -> None:
        self.events.on_instance_recovered(instance_id, now)

    def on_snapshot(self, snapshot: InstanceSnapshot, now: float) -> None:
        self.events.on_snapshot(snapshot, now)

    def forget(self, request_id: str) -> None:
        self.sent.pop(request_id, None)
        self.prompt_tokens.pop(request_id, None)


class SimBackend:
    """Backend of simulated replicas, one per registered instance.

    Each instance's model comes from ``instance.metadata["model_spec"]`` (a name in
    cpsim/data/models or a ModelSpec), else its ``model_name`` when cpsim/data/models has
    it (``llama-3-70b``), else ``default_model``; its step latency from
    ``metadata["latency_model"]`` (an object), else ``metadata["profile"]`` (a conf/profile
    name, which must have been measured for the instance's model, GPU, TP and PP), else a
    shipped profile measured for them, else a RooflineLatencyModel of the model on
    ``instance.gpu_type`` (``cpsim.pricing.latency_for``).
    ``time_scale`` is simulated seconds per wall second (10 = ten times faster than real);
    the manager reads it and keeps its clock, hence its metrics, in simulated seconds.
    ``token_reports="step"`` reports tokens after every engine step (what a streaming
    client sees: the gateway sets it); ``"finish"`` only the first and the count at the end.
    ``client_streams``: requests clients wait for (``cpsim.streams``), by id: their tokens
    come out as text, one word a token."""

    name = "sim"

    def __init__(
        self,
        time_scale: float = 1.0,
        default_model: str = "llama-3-8b",
        scrape_interval_s: float = 0.5,
        kv_link: KVLink | None = None,
        gpu_memory_utilization: float = 0.9,
        token_reports: TokenReports = "finish",
    ) -> None:
        check_positive("time_scale", time_scale)
        check_choice("token_reports", token_reports, ("finish", "step"))
        check_positive("scrape_interval_s", scrape_interval_s)
        self.time_scale = time_scale
        self.default_model = default_model
        self.scrape_interval_s = scrape_interval_s
        self.kv_link = kv_link or KVLink()
        self.gpu_memory_utilization = gpu_memory_utilization
        self.token_reports = token_reports
        self.client_streams: dict[str, ClientStream] = {}
        self._client_events: _ClientEvents | None = None
        self.env = simpy.Environment()
        self.transfers = KVTransfers(self.env)
        self._replicas: dict[str, _Replica] = {}
        self._events: EngineEvents | None = None
        self._clock: Clock = lambda: 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._advancing = False

    # ------------------------------------------------------------------ Backend
    async def start(self, events: EngineEvents, clock: Clock) -> None:
        self._clock = clock
        self._events = self._client_events = _ClientEvents(events, self.client_streams)
        self.env = simpy.Environment(initial_time=clock())
        self.transfers = KVTransfers(self.env)
        self.env.process(self._scrapes())
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def add_instance(self, instance: ExecutionInstance) -> bool:
        check_started(self, self._events, instance.instance_id)
        self._advance()
        model = self._model_of(instance)
        config = ReplicaConfig.from_instance(
            instance, gpu_memory_utilization=self.gpu_memory_utilization
        )
        blocks = num_kv_blocks(
            model,
            instance.gpu_memory_gb,
            instance.tensor_parallel_size,
            instance.pipeline_parallel_size,
            config.block_size,
            self.gpu_memory_utilization,
            expert_parallel_size=instance.expert_parallel_size,
        )
        replica = SimReplica(
            instance.instance_id, config, self._latency_of(instance, model), blocks
        )
        assert self._events is not None
        step = self.token_reports == "step"
        proc = ReplicaProcess(
            self.env, replica, self._events, self.token_reports, use_decode_runs=not step
        )
        self._replicas[instance.instance_id] = _Replica(proc, config, model)
        return True

    async def remove_instance(self, instance_id: str) -> None:
        entry = self._replicas.pop(instance_id, None)
        if entry is not None:
            entry.proc.shut_down()

    def dispatch(self, dispatch: Dispatch) -> None:
        self._advance()
        entry = self._replicas[dispatch.instance_id]
        req = sim_request_for(dispatch, entry.config, self.env.now)
        if self._client_events is not None and dispatch.request_id in self.client_streams:
            self._client_events.prompt_tokens[dispatch.request_id] = dispatch.request.prompt_tokens
        if dispatch.phase is Phase.DECODE:
            delay_s = handoff_s(self.kv_link, dispatch, entry.model)
            self.transfers.start(entry.proc, req, delay_s)
        else:
            entry.proc.submit(req, dispatch.phase)
        self._wake.set()

    def abort(self, abort: Abort) -> None:
        self._advance()
        if self._client_events is not None:
            self._client_events.forget(abort.request_id)
        entry = self._replicas.get(abort.instance_id)
        if entry is not None and not entry.proc.abort(abort.request_id):
            self.transfers.cancel(abort.request_id)  # still travelling to the decode replica
        self._wake.set()

    def replica_process(self, instance_id: str) -> ReplicaProcess:
        """The process of an instance (to inject faults: ``crash``, ``add_fault``)."""
        return self._replicas[instance_id].proc

    # ------------------------------------------------------------------ time
    def _advance(self) -> None:
        """Run the simulation up to the wall clock; never re-entered from inside a run
        (an engine event that makes the manager dispatch lands here)."""
        if self._advancing:
            return
        target = self._clock()
        if target <= self.env.now:
            return
        self._advancing = True
        try:
            self.env.run(until=target)
        finally:
            self._advancing = False

    async def _run(self) -> None:
        while True:
            self._advance()
            nxt = self.env.peek()
            delay = None if math.isinf(nxt) else max(0.0, (nxt - self.env.now) / self.time_scale)
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # lands as the wait ends, and stop() would then wait on this loop forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _scrapes(self) -> Any:
        while True:
            yield self.env.timeout(self.scrape_interval_s)
            assert self._events is not None
            for entry in list(self._replicas.values()):
                self._events.on_snapshot(entry.proc.snapshot(), self.env.now)

    # ------------------------------------------------------------------ instances
    def _model_of(self, instance: ExecutionInstance) -> ModelSpec:
        spec = instance.metadata.get("model_spec")
        if spec is None:
            known = instance.model_name in data_names("models")
            spec = instance.model_name if known else self.default_model
        return spec if isinstance(spec, ModelSpec) else load_model_spec(str(spec))

    @staticmethod
    def _latency_of(instance: ExecutionInstance, model: ModelSpec) -> StepLatencyModel:
        given = instance.metadata.get("latency_model")
        if given is not None:
            latency: StepLatencyModel = given
            return latency
        profile = instance.metadata.get("profile")
        latency, _ = latency_for(instance, None if profile is None else str(profile), None, model)
        return latency
