"""One simulated vLLM engine with vLLM v1 scheduling, paged KV cache and prefix caching."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import numpy as np

from backends.sim.block_manager import BlockPool
from backends.sim.decode_set import DecodeSet
from backends.sim.request import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISHED,
    PREEMPTED,
    RUNNING,
    SimRequest,
)
from backends.sim.scheduling import admission_possible, apply_step, schedule_step
from backends.sim.step import StepOutcome, StepPlan
from cpsim.latency import StepBatch, StepLatencyModel
from cpsim.types import DecodingConfig, ExecutionInstance, PrefillingConfig
from cpsim.validation import check_choice, check_non_negative, check_positive, check_range
from cpsim.views import new_namedtuple

#: A decode run's outcome counts no tokens request by request (see StepOutcome).
_NO_COUNTS: Final[MappingProxyType[str, int]] = MappingProxyType({})

__all__ = ["ReplicaConfig", "SimReplica", "SimRequest"]

SCHEDULERS = ("mixed", "prefill_first")


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """vLLM engine knobs that shape scheduling (names as vLLM's)."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0
    num_gpu_blocks: int | None = None  # overrides the count derived from GPU memory
    gpu_memory_utilization: float = 0.9
    # "mixed": vLLM v1 (prefill chunks and decodes in one step); "prefill_first": vLLM up to
    # 0.5's default scheduler (and DistServe's), where a step that admits waiting prompts
    # computes only them and the running decodes stall for it
    scheduler: str = "mixed"
    # LoRA (vLLM's --enable-lora): the adapters it serves, how many distinct ones a batch may
    # hold (a request whose adapter would exceed it waits: vLLM's scheduler skips it), and
    # what a step with any adapter in it costs beyond the base model's (the LoRA kernels)
    lora_adapters: tuple[str, ...] = ()
    max_loras: int = 1
    lora_step_overhead_frac: float = 0.0

    def __post_init__(self) -> None:
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_positive("max_num_batched_tokens", self.max_num_batched_tokens, integer=True)
        check_positive("max_num_seqs", self.max_num_seqs, integer=True)
        check_positive("block_size", self.block_size, integer=True)
        check_non_negative(
            "long_prefill_token_threshold", self.long_prefill_token_threshold, integer=True
        )
        if self.num_gpu_blocks is not None:
            check_positive("num_gpu_blocks", self.num_gpu_blocks, integer=True)
        check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.01, 1.0)
        check_positive("max_loras", self.max_loras, integer=True)
        check_non_negative("lora_step_overhead_frac", self.lora_step_overhead_frac)

    @classmethod
    def from_instance(cls, instance: ExecutionInstance, **overrides: Any) -> ReplicaConfig:
        """An ExecutionInstance's engine knobs: its PrefillingConfig and DecodingConfig, its
        sequence limit (``ExecutionInstance.max_num_seqs``: the seed's
        ``target_batch_size`` / ``max_parallel_requests``, capped by
        ``max_concurrent_requests``), and the LoRA keys of its metadata."""
        pre = instance.prefilling_config or PrefillingConfig()
        dec = instance.decoding_config or DecodingConfig()
        values: dict[str, Any] = {
            "max_num_batched_tokens": pre.max_num_batched_tokens,
            "enable_chunked_prefill": pre.enable_chunked_prefill,
            "long_prefill_token_threshold": pre.long_prefill_token_threshold,
            "max_num_seqs": instance.max_num_seqs,
            "block_size": dec.block_size,
            "enable_prefix_caching": dec.enable_prefix_caching,
        }
        # LoRA, from the instance's metadata (a cluster group's ``lora_adapters:`` ...)
        meta = instance.metadata
        if instance.lora_adapters:
            values["lora_adapters"] = tuple(sorted(instance.lora_adapters))
        for key in ("max_loras", "lora_step_overhead_frac"):
            if meta.get(key) is not None:
                values[key] = meta[key]
        values.update(overrides)
        return cls(**values)


class SimReplica:
    """A vLLM v1 engine's scheduler and KV cache, with vLLM's verbs and no clock.

    ``schedule()`` -> StepPlan (price it with the latency model) -> ``update_from_output(plan)``
    -> StepOutcome. Between arrivals and finishes a replica repeats alike pure decode steps:
    ``decode_horizon()`` says how many, ``decode_run_times_s(k)`` prices them at once and
    ``advance_decode(j)`` applies j of them, with the same result as j single steps."""

    def __init__(
        self,
        instance_id: str,
        config: ReplicaConfig,
        latency: StepLatencyModel,
        num_gpu_blocks: int,
    ) -> None:
        check_positive("num_gpu_blocks", num_gpu_blocks, integer=True)
        self.instance_id = instance_id
        self.config = config
        self.latency = latency
        self.block_size = config.block_size
        self.pool = BlockPool(num_gpu_blocks)
        self._waiting: deque[SimRequest] = deque()
        self._running: dict[str, SimRequest] = {}  # admission order, as vLLM's running list
        self._explicit: dict[str, SimRequest] = {}  # running, scheduled one by one
        self._decode = DecodeSet(config.block_size)  # running, advanced in bulk
        self._requests: dict[str, SimRequest] = {}
        self._plan: StepPlan | None = None
        self._deferred_aborts: list[tuple[str, str]] = []
        self._adapters = frozenset(config.lora_adapters)
        self._loras: dict[str, int] = {}  # running requests per adapter
        self._vectorised = getattr(latency, "decode_step_times_s", None)
        self._linear = getattr(latency, "decode_step_linear_s", None)
        self.num_steps = 0
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ state
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage_frac(self) -> float:
        return self.pool.usage_frac

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Prompt tokens hit over prompt tokens looked up, since the start (None before any)."""
        if self.num_prefix_query_tokens == 0:
            return None
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens

    def get(self, request_id: str) -> SimRequest | None:
        """The request (progress brought up to date) while the replica holds it."""
        req = self._requests.get(request_id)
        if req is not None and req.decode_finish_clock >= 0:
            self._decode.sync(req)
        return req

    def running_ids(self) -> list[str]:
        return list(self._running)

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self._waiting]

    def blocks_needed(self, req: SimRequest) -> int:
        """Blocks a request needs to hold its prompt and all its output."""
        return -(-(req.num_prompt_tokens + req.max_tokens) // self.block_size)

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, req: SimRequest) -> None:
        if req.request_id in self._requests:
            raise ValueError(f"request_id={req.request_id!r} is already on {self.instance_id}")
        if req.status != 0 or req.num_computed_tokens or req.num_output_tokens:
            raise ValueError(f"request {req.request_id!r} was already used on a replica")
        if req.lora is not None and req.lora not in self._adapters:
            req.lora = None  # the base model's name, or an adapter it does not serve
        self._requests[req.request_id] = req
        self._waiting.append(req)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request; False when the replica does not hold it. During a step in flight
        the abort takes effect when the step's output is applied."""
        if request_id not in self._requests:
            return False
        if self._plan is not None:
            self._deferred_aborts.append((request_id, FINISH_ABORT))
        else:
            self._finish(self._requests[request_id], FINISH_ABORT)
        return True

    def finish_requests(self, request_ids: Iterable[str], reason: str) -> list[SimRequest]:
        """Finish held requests from outside (aborts); returns those it held."""
        done = []
        for request_id in request_ids:
            req = self._requests.get(request_id)
            if req is None:
                continue
            if self._plan is not None:
                self._deferred_aborts.append((request_id, reason))
            else:
                self._finish(req, reason)
            done.append(req)
        return done

    def clear(self) -> list[SimRequest]:
        """Drop everything (a crash): requests lost, KV cache empty. Returns the lost requests."""
        lost = list(self._requests.values())
        for req in lost:
            req.status = FINISHED
            req.finish_reason = FINISH_ABORT
        self.pool = BlockPool(self.pool.num_blocks)
        self._waiting.clear()
        self._running.clear()
        self._loras.clear()
        self._explicit.clear()
        self._decode = DecodeSet(self.block_size)
        self._requests.clear()
        self._plan = None
        self._deferred_aborts.clear()
        return lost

    def _finish(self, req: SimRequest, reason: str) -> None:
        if req.decode_finish_clock >= 0:
            self._decode.leave(req)
        rid = req.request_id
        if rid in self._running:
            del self._running[rid]
            self._explicit.pop(rid, None)
            self._lora_stopped(req)
        elif req.status != RUNNING:
            self._waiting.remove(req)
        self._free(req)
        del self._requests[rid]
        req.status = FINISHED
        req.finish_reason = reason

    def _free(self, req: SimRequest) -> None:
        held = req.held_hashes
        self.pool.release(req.num_blocks - len(held))
        if held:
            self.pool.release_cached(held)
            req.held_hashes = []
        req.num_blocks = 0

    def _preempt(self, req: SimRequest) -> None:
        """Recompute preemption: blocks freed, progress reset, front of the waiting queue."""
        if req.decode_finish_clock >= 0:
            self._decode.leave(req)
        del self._running[req.request_id]
        self._explicit.pop(req.request_id, None)
        self._lora_stopped(req)
        self._free(req)
        req.num_computed_tokens = 0
        req.num_registered_blocks = 0
        req.prompt_cached = False  # the transferred KV is gone: recompute it here
        req.status = PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req)

    # ------------------------------------------------------------------ LoRA
    def lora_admissible(self, req: SimRequest) -> bool:
        """Whether admitting ``req`` keeps the running batch within ``max_loras`` adapters."""
        lora = req.lora
        return lora is None or lora in self._loras or len(self._loras) < self.config.max_loras

    def lora_started(self, req: SimRequest) -> None:
        if req.lora is not None:
            self._loras[req.lora] = self._loras.get(req.lora, 0) + 1

    def _lora_stopped(self, req: SimRequest) -> None:
        lora = req.lora
        if lora is not None:
            left = self._loras[lora] - 1
            if left:
                self._loras[lora] = left
            else:
                del self._loras[lora]

    def step_factor(self) -> float:
        """What a step costs over the base model's: more while an adapter runs."""
        return 1.0 + self.config.lora_step_overhead_frac if self._loras else 1.0

    # ------------------------------------------------------------------ stepping
    def schedule(self) -> StepPlan:
        if self._plan is not None:
            raise RuntimeError("schedule() called twice without update_from_output()")
        plan = schedule_step(self)
        self._plan = plan
        return plan

    def update_from_output(self, plan: StepPlan) -> StepOutcome:
        if plan is not self._plan:
            raise ValueError("update_from_output() got a plan this replica did not just schedule")
        self._plan = None
        outcome = apply_step(self, plan)
        return self._apply_deferred_aborts(outcome)

    def _apply_deferred_aborts(self, outcome: StepOutcome) -> StepOutcome:
        if not self._deferred_aborts:
            return outcome
        aborted = set()
        for request_id, reason in self._deferred_aborts:
            req = self._requests.get(request_id)
            if req is not None:
                self._finish(req, reason)
                aborted.add(request_id)
        self._deferred_aborts.clear()
        if not aborted:
            return outcome
        return StepOutcome(
            outcome.num_steps,
            tuple(i for i in outcome.first_token_ids if i not in aborted),
            {i: n for i, n in outcome.token_counts.items() if i not in aborted},
            tuple(r for r in outcome.finished if r.request_id not in aborted),
            outcome.preempted_ids,
            tuple(i for i in outcome.bulk_ids if i not in aborted),
            outcome.bulk_steps,
        )

    # ------------------------------------------------------------------ pure decode runs
    def decode_horizon(self) -> int:
        """How many upcoming steps are pure decode over the same running set: no waiting
        request can be admitted, nobody is prefilling, nobody finishes before the last of
        them, and the KV growth fits without preemption. 0 when the next step is not one."""
        decode = self._decode
        if self._explicit or self._plan is not None or not decode.members:
            return 0
        if len(decode) > self.config.max_num_batched_tokens:
            return 0
        if self._waiting and admission_possible(self, decode.new_blocks(1)):
            return 0
        steps = decode.steps_to_next_finish()
        free = self.pool.num_free
        if len(decode) * -(-steps // self.block_size) <= free:  # each member takes at most this
            return steps
        return min(steps, decode.max_steps_within(free))

    def decode_run_linear_s(self, num_steps: int) -> tuple[float, float] | None:
        """(first, increment): step i of the next pure decode run lasts first + increment * i,
        when the latency model can say so in closed form (else None)."""
        if self._linear is None or not self._decode.members:
            return None
        decode = self._decode
        n = len(decode)
        result: tuple[float, float] | None = self._linear(n, decode.next_context_tokens(), n)
        return result

    def decode_run_times_s(self, num_steps: int) -> np.ndarray:
        """Cumulative end times (s, from the run's start) of the next ``num_steps`` pure decode
        steps; each step's context grows by the number of sequences."""
        linear = self.decode_run_linear_s(num_steps)
        if linear is not None:
            first, increment = linear
            steps = np.arange(1, num_steps + 1, dtype=np.float64)
            return steps * first + increment * (steps * (steps - 1.0) * 0.5)
        contexts = self._decode.run_contexts(num_steps)
        n = len(self._decode)
        if self._vectorised is not None:
            times = np.asarray(self._vectorised(n, contexts), dtype=np.float64)
        else:
            times = np.fromiter(
                (
                    self.latency.step_time_s(StepBatch(num_decode_seqs=n, decode_context_tokens=c))
                    for c in contexts.tolist()
                ),
                dtype=np.float64,
                count=num_steps,
            )
        return np.cumsum(times)

    def advance_decode(self, num_steps: int) -> StepOutcome:
        """Apply ``num_steps`` (<= decode_horizon()) pure decode steps at once."""
        decode = self._decode
        if num_steps < 1 or self._explicit or self._plan is not None:
            raise ValueError(f"advance_decode({num_steps}) needs a pure decode run of >= 1 step")
        if num_steps > decode.steps_to_next_finish():
            raise ValueError(f"advance_decode({num_steps}) runs past a request's last token")
        new_blocks = decode.new_blocks(num_steps)
        if new_blocks > self.pool.num_free:
            raise ValueError(f"advance_decode({num_steps}) needs {new_blocks} blocks, "
                             f"only {self.pool.num_free} free")
        self.pool.allocate(new_blocks)
        bulk_ids = tuple(decode.members)
        done = decode.advance(num_steps)
        for req in done:
            self._complete(req)
        self.num_steps += num_steps
        outcome = (num_steps, (), _NO_COUNTS, tuple(done), (), bulk_ids, num_steps)
        return new_namedtuple(StepOutcome, outcome)

    def _complete(self, req: SimRequest) -> None:
        rid = req.request_id
        del self._running[rid]
        self._explicit.pop(rid, None)
        self._lora_stopped(req)
        self._free(req)
        del self._requests[rid]
        req.status = FINISHED
        req.finish_reason = FINISH_LENGTH

    def check(self) -> None:
        """Raise AssertionError when block accounting is inconsistent (tests)."""
        self.pool.check()
        held_private = 0
        for req in self._running.values():
            if req.decode_finish_clock >= 0:
                self._decode.sync(req)
            assert req.num_blocks == -(-req.num_computed_tokens // self.block_size), req
            held_private += req.num_blocks - len(req.held_hashes)
        for req in self._waiting:
            assert req.num_blocks == 0 and not req.held_hashes
        in_use = self.pool.num_blocks - self.pool.num_free
        shared = {h for r in self._running.values() for h in r.held_hashes}
        assert in_use == held_private + len(shared), (in_use, held_private, len(shared))
        loras: dict[str, int] = {}
        for req in self._running.values():
            if req.lora is not None:
                loras[req.lora] = loras.get(req.lora, 0) + 1
        assert loras == self._loras and len(loras) <= self.config.max_loras, (loras, self._loras)
