"""The replica's bulk decode set: decoding requests advanced together, O(1) per step."""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np

from backends.sim.request import SimRequest


class DecodeSet:
    """Requests in steady decode, each gaining one token per step, stored by offsets to a clock.

    For a member, computed tokens = ``decode_offset + clock`` and output tokens =
    ``decode_out_offset + clock``. A member needs a new block in the step that starts at
    clock ``t`` iff its computed tokens are a multiple of the block size, so the blocks a step
    takes are ``phase_count[(-t) mod block_size]``; the context a step attends to is
    ``sum(offset) + n * (t + 1)``; finishes come from a heap keyed by the finishing clock.
    Nothing per member is touched per step."""

    __slots__ = ("_heap", "_phase_count", "_seq", "_sum_offset", "block_size", "clock", "members")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.clock = 0
        self.members: dict[str, SimRequest] = {}
        self._phase_count = [0] * block_size
        self._sum_offset = 0
        self._heap: list[tuple[int, int, SimRequest]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.members)

    def enter(self, req: SimRequest) -> None:
        offset = req.num_computed_tokens - self.clock
        req.decode_offset = offset
        req.decode_out_offset = req.num_output_tokens - self.clock
        finish = self.clock + req.max_tokens - req.num_output_tokens
        req.decode_finish_clock = finish
        self.members[req.request_id] = req
        self._phase_count[offset % self.block_size] += 1
        self._sum_offset += offset
        heapq.heappush(self._heap, (finish, next(self._seq), req))

    def sync(self, req: SimRequest) -> None:
        """Write a member's progress fields from the clock."""
        req.num_computed_tokens = req.decode_offset + self.clock
        req.num_output_tokens = req.decode_out_offset + self.clock
        req.num_blocks = -(-req.num_computed_tokens // self.block_size)

    def leave(self, req: SimRequest) -> None:
        self.sync(req)
        del self.members[req.request_id]
        self._phase_count[req.decode_offset % self.block_size] -= 1
        self._sum_offset -= req.decode_offset
        req.decode_finish_clock = -1  # its heap entry is now stale

    def leave_all(self) -> list[SimRequest]:
        reqs = list(self.members.values())
        for req in reqs:
            self.leave(req)
        self._heap.clear()
        return reqs

    def steps_to_next_finish(self) -> int:
        heap = self._heap
        while heap and heap[0][2].decode_finish_clock != heap[0][0]:
            heapq.heappop(heap)  # stale entry of a request that left
        return heap[0][0] - self.clock if heap else 0

    def new_blocks(self, num_steps: int) -> int:
        """Blocks the next ``num_steps`` steps allocate, in total."""
        bs = self.block_size
        if num_steps == 1:  # the common case: the next step alone
            return self._phase_count[(-self.clock) % bs]
        full, rem = divmod(num_steps, bs)
        total = full * len(self.members)
        phase, clock = self._phase_count, self.clock
        for t in range(clock, clock + rem):
            total += phase[(-t) % bs]
        return total

    def max_steps_within(self, num_free_blocks: int) -> int:
        """The most steps whose block growth fits in ``num_free_blocks`` (no preemption)."""
        n = len(self.members)
        if n == 0:
            return 0
        bs = self.block_size
        periods, rem = divmod(num_free_blocks, n)
        phase, clock = self._phase_count, self.clock
        cum, extra = 0, 0
        for r in range(bs - 1):
            cum += phase[(-(clock + r)) % bs]
            if cum > rem:
                break
            extra = r + 1
        return periods * bs + extra

    def next_context_tokens(self) -> int:
        """Context the next step attends to: sum over members of computed tokens + 1."""
        n = len(self.members)
        return self._sum_offset + n * (self.clock + 1)

    def run_contexts(self, num_steps: int) -> np.ndarray:
        """Context of each of the next ``num_steps`` steps (it grows by n per step)."""
        n = len(self.members)
        first = self.next_context_tokens()
        return first + n * np.arange(num_steps, dtype=np.int64)

    def advance(self, num_steps: int) -> list[SimRequest]:
        """Move the clock; members whose last token falls at or before it leave, finished."""
        self.clock += num_steps
        clock, heap = self.clock, self._heap
        done: list[SimRequest] = []
        while heap and heap[0][0] <= clock:
            finish, _, req = heapq.heappop(heap)
            if req.decode_finish_clock == finish:
                self.leave(req)
                done.append(req)
        return done


def linear_run_end_s(first_s: float, increment_s: float, num_steps: int) -> float:
    """End of step ``num_steps`` of a run whose step i (from 0) lasts first + increment * i."""
    return num_steps * first_s + increment_s * (num_steps * (num_steps - 1) // 2)


def linear_run_steps_done(first_s: float, increment_s: float, elapsed_s: float) -> int:
    """How many steps of such a run have ended by ``elapsed_s``."""
    if elapsed_s <= 0.0:
        return 0
    if increment_s <= 0.0:
        steps = int(elapsed_s // first_s) if first_s > 0 else 0
    else:
        half = 0.5 * increment_s
        lin = first_s - half
        steps = int((-lin + math.sqrt(lin * lin + 4.0 * half * elapsed_s)) / (2.0 * half))
    while steps > 0 and linear_run_end_s(first_s, increment_s, steps) > elapsed_s:
        steps -= 1
    while linear_run_end_s(first_s, increment_s, steps + 1) <= elapsed_s:
        steps += 1
    return steps
