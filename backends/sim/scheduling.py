"""The replica's step logic, as vLLM v1's Scheduler: running requests, then waiting ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backends.sim.request import RUNNING, SimRequest
from backends.sim.step import StepOutcome, StepPlan
from cpsim.latency import StepBatch
from cpsim.views import new_namedtuple

if TYPE_CHECKING:
    from backends.sim.replica import SimReplica


def schedule_step(rep: SimReplica) -> StepPlan:
    """One scheduling decision. Running requests first, in admission order, each getting its
    next prefill chunk or one decode token within the token budget; a request that cannot get
    blocks preempts the newest running request (itself last). Then, if nobody was preempted,
    waiting requests are admitted in order while the budget, ``max_num_seqs`` and blocks allow.

    When everyone running fits the budget and the free blocks, order cannot matter, so the
    bulk decode set is scheduled as a whole; otherwise it is dissolved and every running
    request is scheduled one by one, exactly as vLLM orders them."""
    cfg, pool, decode, bs = rep.config, rep.pool, rep._decode, rep.block_size
    budget = cfg.max_num_batched_tokens
    chunks: list[tuple[SimRequest, int]] = []
    if cfg.scheduler == "prefill_first" and rep._waiting:
        prompts = _prompt_only_step(rep)
        if prompts is not None:
            return prompts
    preempted: list[str] = []
    num_bulk = len(decode)
    want_tokens = num_bulk
    decode_blocks = decode.new_blocks(1) if num_bulk else 0
    want_blocks = decode_blocks
    wants: list[tuple[SimRequest, int]] = []
    for req in rep._explicit.values():
        num = _running_chunk(rep, req, budget)
        if num:
            wants.append((req, num))
            want_tokens += num
            want_blocks += -(-(req.num_computed_tokens + num) // bs) - req.num_blocks
    bulk_ids: tuple[str, ...] = ()
    if want_tokens <= budget and want_blocks <= pool.num_free:
        if num_bulk:
            pool.allocate(decode_blocks)
            bulk_ids = tuple(decode.members)
        for req, num in wants:
            need = -(-(req.num_computed_tokens + num) // bs) - req.num_blocks
            pool.allocate(need)
            req.num_blocks += need
            chunks.append((req, num))
        budget -= want_tokens
    else:
        for req in decode.leave_all():
            rep._explicit[req.request_id] = req
        budget = _schedule_running_in_order(rep, budget, chunks, preempted)
    new_ids: list[str] = []
    if not preempted:
        _admit_waiting(rep, budget, chunks, new_ids)
    batch = _price_features(rep, chunks, len(bulk_ids))
    return new_namedtuple(
        StepPlan,
        (rep.num_steps, tuple(chunks), bulk_ids, tuple(new_ids), tuple(preempted), batch),
    )


def _prompt_only_step(rep: SimReplica) -> StepPlan | None:
    """vLLM v0's step when prompts wait: as many as the budget, ``max_num_seqs`` and the free
    blocks admit, and nothing else (the running decodes wait); None when none is admitted."""
    chunks: list[tuple[SimRequest, int]] = []
    new_ids: list[str] = []
    _admit_waiting(rep, rep.config.max_num_batched_tokens, chunks, new_ids)
    if not chunks:
        return None
    batch = _price_features(rep, chunks, 0)
    return new_namedtuple(
        StepPlan, (rep.num_steps, tuple(chunks), (), tuple(new_ids), (), batch)
    )


def _running_chunk(rep: SimReplica, req: SimRequest, budget: int) -> int:
    """Tokens a running request asks for now (0: skipped, no chunked prefill)."""
    cfg = rep.config
    num = req.num_prompt_tokens + req.num_output_tokens - req.num_computed_tokens
    threshold = cfg.long_prefill_token_threshold
    if 0 < threshold < num:
        num = threshold
    if not cfg.enable_chunked_prefill and num > budget:
        return 0
    return min(num, budget)


def _schedule_running_in_order(
    rep: SimReplica, budget: int, chunks: list[tuple[SimRequest, int]], preempted: list[str]
) -> int:
    pool, bs = rep.pool, rep.block_size
    running = list(rep._running.values())
    index = 0
    while index < len(running) and budget > 0:
        req = running[index]
        num = _running_chunk(rep, req, budget)
        if num == 0:
            index += 1
            continue
        need = -(-(req.num_computed_tokens + num) // bs) - req.num_blocks
        scheduled = True
        while need > pool.num_free:
            victim = running.pop()
            rep._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                scheduled = False
                break
        if not scheduled:
            break
        pool.allocate(need)
        req.num_blocks += need
        chunks.append((req, num))
        budget -= num
        index += 1
    return budget


def _prefix_hit(rep: SimReplica, req: SimRequest) -> tuple[int, int]:
    """(cached blocks hit, tokens already computed) for a request about to be admitted. The
    last token is always recomputed; a PD hand-off has its prompt computed but the last token."""
    max_hit_tokens = req.num_prompt_tokens + req.num_output_tokens - 1
    hit_blocks = 0
    if rep.config.enable_prefix_caching and req.block_hashes:
        hit_blocks = rep.pool.longest_hit(req.block_hashes, max_hit_tokens // rep.block_size)
    computed = hit_blocks * rep.block_size
    if req.prompt_cached:
        computed = req.num_prompt_tokens - 1
    return hit_blocks, computed


def _admission_needs(rep: SimReplica, req: SimRequest, budget: int) -> tuple[int, int, int, int]:
    """(hit blocks, computed tokens, tokens to schedule (0: skip), free blocks it needs)."""
    cfg, bs = rep.config, rep.block_size
    hit_blocks, computed = _prefix_hit(rep, req)
    num = req.num_prompt_tokens + req.num_output_tokens - computed
    threshold = cfg.long_prefill_token_threshold
    if 0 < threshold < num:
        num = threshold
    if not cfg.enable_chunked_prefill and num > budget:
        return hit_blocks, computed, 0, 0
    num = min(num, budget)
    need = -(-(computed + num) // bs) - hit_blocks
    if hit_blocks:
        need += rep.pool.num_evictable(req.block_hashes[:hit_blocks])
    return hit_blocks, computed, num, need


def _admit_waiting(
    rep: SimReplica, budget: int, chunks: list[tuple[SimRequest, int]], new_ids: list[str]
) -> None:
    cfg, pool, waiting = rep.config, rep.pool, rep._waiting
    skipped: list[SimRequest] = []
    while waiting and budget > 0:
        if len(rep._running) >= cfg.max_num_seqs:
            break
        req = waiting[0]
        if not rep.lora_admissible(req):  # its adapter would exceed max_loras: it waits
            skipped.append(waiting.popleft())
            continue
        hit_blocks, computed, num, need = _admission_needs(rep, req, budget)
        if num == 0:
            skipped.append(waiting.popleft())
            continue
        if need > pool.num_free:
            break
        waiting.popleft()
        total_blocks = -(-(computed + num) // rep.block_size)
        if hit_blocks:
            hits = req.block_hashes[:hit_blocks]
            pool.acquire(hits)
            req.held_hashes = list(hits)
        pool.allocate(total_blocks - hit_blocks)
        req.num_blocks = total_blocks
        req.num_computed_tokens = computed
        req.num_registered_blocks = hit_blocks
        if not req.scheduled_before:
            req.scheduled_before = True
            req.num_prefix_hit_tokens = hit_blocks * rep.block_size
            if cfg.enable_prefix_caching:
                rep.num_prefix_query_tokens += req.num_prompt_tokens
                rep.num_prefix_hit_tokens += req.num_prefix_hit_tokens
        req.status = RUNNING
        rep._running[req.request_id] = req
        rep.lora_started(req)
        rep._explicit[req.request_id] = req
        chunks.append((req, num))
        new_ids.append(req.request_id)
        budget -= num
    waiting.extendleft(reversed(skipped))


def admission_possible(rep: SimReplica, reserved_blocks: int) -> bool:
    """Would the next pure decode step admit a waiting request (blocks ``reserved_blocks``
    taken by the decode growth first)? Side-effect free."""
    cfg = rep.config
    if len(rep._running) >= cfg.max_num_seqs:
        return False
    budget = cfg.max_num_batched_tokens - len(rep._running)
    if budget <= 0:
        return False
    free = rep.pool.num_free - reserved_blocks
    for req in rep._waiting:
        if not rep.lora_admissible(req):
            continue
        _, _, num, need = _admission_needs(rep, req, budget)
        if num == 0:
            continue
        return need <= free
    return False


def _price_features(
    rep: SimReplica, chunks: list[tuple[SimRequest, int]], num_bulk: int
) -> StepBatch:
    prefill_tokens = sum_sq = prefill_context = prefill_seqs = decode_seqs = decode_context = 0
    for req, num in chunks:
        computed = req.num_computed_tokens
        is_decode = computed == req.num_prompt_tokens + req.num_output_tokens - 1 and (
            req.num_output_tokens > 0 or req.prompt_cached
        )
        if is_decode:
            decode_seqs += 1
            decode_context += computed + 1
        else:
            prefill_tokens += num
            sum_sq += num * num
            prefill_context += computed
            prefill_seqs += 1
    if num_bulk:
        decode_seqs += num_bulk
        decode_context += rep._decode.next_context_tokens()
    return new_namedtuple(
        StepBatch,
        (prefill_tokens, sum_sq, prefill_context, prefill_seqs, decode_seqs, decode_context),
    )


def apply_step(rep: SimReplica, plan: StepPlan) -> StepOutcome:
    """The step ran: advance computed tokens, sample a token where a sequence is complete,
    cache full prompt blocks, finish requests at ``max_tokens``."""
    decode = rep._decode
    finished: list[SimRequest] = []
    first: list[str] = []
    counts: dict[str, int] = {}
    if plan.bulk_decode_ids:
        for req in decode.advance(1):
            rep._complete(req)
            finished.append(req)
    caching = rep.config.enable_prefix_caching
    for req, num in plan.chunks:
        if req.status != RUNNING:
            continue
        computed = req.num_computed_tokens + num
        req.num_computed_tokens = computed
        if caching and req.num_registered_blocks < len(req.block_hashes):
            _register_full_blocks(rep, req)
        if computed < req.num_prompt_tokens + req.num_output_tokens:
            continue  # a prefill chunk that does not end the sequence samples nothing
        out = req.num_output_tokens + 1
        req.num_output_tokens = out
        counts[req.request_id] = 1
        if out == 1:
            first.append(req.request_id)
        if out >= req.max_tokens:
            rep._complete(req)
            finished.append(req)
        else:
            del rep._explicit[req.request_id]
            decode.enter(req)
    rep.num_steps += 1
    return new_namedtuple(
        StepOutcome,
        (1, tuple(first), counts, tuple(finished), plan.preempted_ids, plan.bulk_decode_ids, 1),
    )


def _register_full_blocks(rep: SimReplica, req: SimRequest) -> None:
    full = min(req.num_computed_tokens, req.num_prompt_tokens) // rep.block_size
    upto = min(full, len(req.block_hashes))
    pool = rep.pool
    for index in range(req.num_registered_blocks, upto):
        block_hash = req.block_hashes[index]
        if pool.register(block_hash):
            req.held_hashes.append(block_hash)
    req.num_registered_blocks = max(upto, req.num_registered_blocks)
