"""The simulated replica against vLLM v1's scheduling rules, in closed form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sim.request import PREEMPTED, SimRequest
from cpsim.latency import StepBatch
from tests.sim.conftest import COEFFICIENTS, drive, make_replica

C = COEFFICIENTS


def prefill_price(prompt: int, context: int = 0) -> float:
    return (
        C["step_s"] + C["prefill_step_s"] + C["prefill_token_s"] * prompt
        + C["prefill_token_sq_s"] * prompt**2 + C["prefill_context_token_s"] * context
    )


def decode_price(num_seqs: int, context: int) -> float:
    return C["step_s"] + C["decode_seq_s"] * num_seqs + C["decode_context_token_s"] * context


def test_lone_request_ttft_is_the_priced_prefill_step(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency)
    rep.add_request(SimRequest("a", 500, 4))
    plan = rep.schedule()
    assert plan.batch == StepBatch(500, 500**2, 0, 1, 0, 0)
    assert latency.step_time_s(plan.batch) == pytest.approx(prefill_price(500))
    outcome = rep.update_from_output(plan)
    assert outcome.first_token_ids == ("a",)
    assert outcome.new_token_counts == {"a": 1}


@pytest.mark.parametrize("fast", [False, True])
def test_decode_run_times_are_the_sum_of_priced_steps(latency, fast) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency)
    rep.add_request(SimRequest("a", 300, 50))
    seen, _ = drive(rep, fast)
    first_s, finish_s, req = seen["a"]
    assert first_s == pytest.approx(prefill_price(300))
    # decode step i computes token 300 + i - 1 and attends to 300 + i tokens
    expected = first_s + sum(decode_price(1, 300 + i) for i in range(1, 50))
    assert finish_s == pytest.approx(expected, rel=1e-12)
    assert req.num_output_tokens == 50 and req.num_computed_tokens == 349


def test_chunked_prefill_splits_a_long_prompt_into_budget_chunks(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, max_num_batched_tokens=4096)
    rep.add_request(SimRequest("long", 10_000, 2))
    chunks = []
    for _ in range(3):
        plan = rep.schedule()
        chunks.append([(r.request_id, n) for r, n in plan.chunks])
        outcome = rep.update_from_output(plan)
    assert chunks == [[("long", 4096)], [("long", 4096)], [("long", 1808)]]
    assert outcome.first_token_ids == ("long",)
    assert plan.batch.prefill_context_tokens == 8192


def test_without_chunked_prefill_a_prompt_over_budget_waits_and_others_pass(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, max_num_batched_tokens=1000, enable_chunked_prefill=False)
    rep.add_request(SimRequest("small", 600, 3))
    rep.add_request(SimRequest("big", 900, 3))
    rep.add_request(SimRequest("tiny", 300, 3))
    plan = rep.schedule()
    assert [(r.request_id, n) for r, n in plan.chunks] == [("small", 600), ("tiny", 300)]
    assert rep.waiting_ids() == ["big"]


def test_max_num_seqs_caps_the_running_set(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, max_num_seqs=4)
    for i in range(10):
        rep.add_request(SimRequest(f"r{i}", 50, 100))
    for _ in range(5):
        rep.update_from_output(rep.schedule())
        assert rep.num_running == 4 and rep.num_waiting == 6
    assert rep.running_ids() == ["r0", "r1", "r2", "r3"]


def test_running_requests_first_then_waiting_within_the_budget(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, max_num_batched_tokens=100)
    rep.add_request(SimRequest("a", 90, 5))
    rep.update_from_output(rep.schedule())
    rep.add_request(SimRequest("b", 200, 5))
    plan = rep.schedule()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 99}
    assert plan.batch.num_decode_seqs == 1 and plan.batch.num_prefill_tokens == 99


def _prefill_first_with_one_decoding(latency):  # type: ignore[no-untyped-def]
    """A vLLM-v0-style replica whose request "a" is decoding."""
    rep = make_replica(
        latency, max_num_batched_tokens=1000, enable_chunked_prefill=False,
        scheduler="prefill_first",
    )  # fmt: skip
    rep.add_request(SimRequest("a", 90, 5))
    rep.update_from_output(rep.schedule())
    return rep


def test_prefill_first_steps_compute_only_prompts_and_stall_the_decodes(latency) -> None:  # type: ignore[no-untyped-def]
    rep = _prefill_first_with_one_decoding(latency)
    rep.add_request(SimRequest("b", 200, 5))
    rep.add_request(SimRequest("c", 300, 5))
    plan = rep.schedule()  # vLLM v0: the waiting prompts alone, "a" waits a step
    assert plan.num_scheduled_tokens == {"b": 200, "c": 300}
    assert plan.batch == StepBatch(500, 200**2 + 300**2, 0, 2, 0, 0)
    rep.update_from_output(plan)
    plan = rep.schedule()  # nothing waits: every running sequence decodes
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1, "c": 1}
    assert plan.batch.num_prefill_tokens == 0 and plan.batch.num_decode_seqs == 3


def test_a_prompt_that_cannot_be_admitted_does_not_stall_prefill_first_decodes(latency) -> None:  # type: ignore[no-untyped-def]
    rep = _prefill_first_with_one_decoding(latency)
    rep.add_request(SimRequest("huge", 5000, 5))  # over the budget: never admitted
    plan = rep.schedule()
    assert plan.num_scheduled_tokens == {"a": 1}


def test_an_unknown_scheduler_is_named_with_the_allowed_ones(latency) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"scheduler.*'v0'.*mixed.*prefill_first"):
        make_replica(latency, scheduler="v0")


def test_preemption_when_blocks_run_short_sends_the_newest_to_the_front(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, num_blocks=9, block_size=16)
    rep.add_request(SimRequest("old", 64, 40))  # 4 blocks, grows to 7
    rep.add_request(SimRequest("new", 64, 40))
    rep.add_request(SimRequest("late", 64, 2))  # does not fit next to them: waits
    preempted = []
    for _ in range(40):
        plan = rep.schedule()
        preempted += plan.preempted_ids
        if plan.preempted_ids:
            assert rep.waiting_ids() == ["new", "late"]
            victim = rep.get("new")
            assert victim is not None and victim.status == PREEMPTED
            assert victim.num_computed_tokens == 0 and victim.num_blocks == 0
            kept = victim.num_output_tokens
            assert kept > 0
        rep.update_from_output(plan)
        rep.check()
    assert preempted[0] == "new"
    seen, _ = drive(rep, fast=True)
    req = seen["new"][2]
    assert req.num_preemptions >= 1 and req.num_output_tokens == 40
    # recompute covers the prompt and the tokens generated before the preemption
    assert req.num_computed_tokens == 64 + 40 - 1


def test_no_preemption_when_blocks_are_plentiful(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, num_blocks=10_000)
    for i in range(50):
        rep.add_request(SimRequest(f"r{i}", 100 + 7 * i, 30 + i))
    seen, _ = drive(rep, fast=True)
    assert all(entry[2].num_preemptions == 0 for entry in seen.values())
    assert rep.num_preemptions == 0 and rep.num_free_blocks == 10_000


def test_prefix_cache_hits_all_full_blocks_but_the_last_token(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, block_size=16)
    hashes = tuple(range(100, 108))  # 8 full blocks = 128 tokens
    rep.add_request(SimRequest("first", 128, 2, hashes))
    drive(rep, fast=True)
    rep.add_request(SimRequest("same", 128, 2, hashes))
    plan = rep.schedule()
    # the whole prompt is cached; vLLM recomputes the last token, so the last block is not a hit
    assert plan.num_scheduled_tokens == {"same": 16}
    assert plan.batch.prefill_context_tokens == 112
    rep.update_from_output(plan)
    assert rep.get("same").num_prefix_hit_tokens == 112  # type: ignore[union-attr]
    rep.add_request(SimRequest("other", 130, 2, tuple(range(200, 208))))
    plan = rep.schedule()
    assert plan.num_scheduled_tokens["other"] == 130


def test_prefix_hit_on_a_longer_prompt_hits_every_shared_block(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, block_size=16)
    rep.add_request(SimRequest("a", 100, 1, tuple(range(6))))
    drive(rep, fast=True)
    rep.add_request(SimRequest("b", 200, 1, (*range(6), 50, 51, 52)))
    plan = rep.schedule()
    assert plan.num_scheduled_tokens == {"b": 200 - 96}


def test_a_pd_decode_handoff_needs_the_whole_prompt_and_decodes_at_once(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, block_size=16, num_blocks=100)
    rep.add_request(SimRequest("d", 160, 3, prompt_cached=True))
    plan = rep.schedule()
    assert plan.batch == StepBatch(num_decode_seqs=1, decode_context_tokens=160)
    assert rep.num_free_blocks == 100 - 10
    outcome = rep.update_from_output(plan)
    assert outcome.first_token_ids == ("d",)


def test_abort_frees_blocks_in_waiting_running_and_mid_step(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, num_blocks=100)
    rep.add_request(SimRequest("a", 100, 50))
    rep.add_request(SimRequest("b", 100, 50))
    rep.update_from_output(rep.schedule())
    rep.add_request(SimRequest("w", 100, 50))
    assert rep.abort_request("w") and rep.num_waiting == 0
    assert rep.abort_request("a")
    plan = rep.schedule()
    assert rep.abort_request("b")  # in flight: applied when the step's output is
    outcome = rep.update_from_output(plan)
    assert outcome.new_token_counts == {} and rep.num_running == 0
    assert rep.num_free_blocks == 100 and not rep.abort_request("b")


requests_strategy = st.lists(
    st.tuples(st.integers(1, 300), st.integers(1, 60), st.integers(0, 3)), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(requests_strategy, st.integers(20, 200), st.sampled_from([4, 16]))
def test_decode_runs_equal_single_steps(requests, num_blocks, block_size) -> None:  # type: ignore[no-untyped-def]
    from cpsim.profiles import ProfiledLatencyModel

    latency = ProfiledLatencyModel("m", "g", COEFFICIENTS)
    results = []
    for fast in (False, True):
        rep = make_replica(latency, num_blocks=num_blocks, block_size=block_size,
                           max_num_batched_tokens=256, max_num_seqs=6)
        for i, (prompt, out, prefix) in enumerate(requests):
            if (prompt + out + block_size - 1) // block_size > num_blocks:
                continue
            hashes = tuple(range(prefix * 1000, prefix * 1000 + prompt // block_size))
            rep.add_request(SimRequest(f"r{i}", prompt, out, hashes if prefix else ()))
        seen, end = drive(rep, fast)
        stats = {
            rid: (first, finish, req.num_output_tokens, req.num_preemptions,
                  req.num_prefix_hit_tokens)
            for rid, (first, finish, req) in seen.items()
        }
        results.append((stats, end, rep.num_steps, rep.num_free_blocks))
    (slow, slow_end, slow_steps, slow_free), (fast, fast_end, fast_steps, fast_free) = results
    assert slow.keys() == fast.keys()
    for rid in slow:
        assert slow[rid][2:] == fast[rid][2:]
        assert slow[rid][0] == pytest.approx(fast[rid][0], rel=1e-9)
        assert slow[rid][1] == pytest.approx(fast[rid][1], rel=1e-9)
    assert slow_end == pytest.approx(fast_end, rel=1e-9)
    assert slow_steps == fast_steps and slow_free == fast_free


def test_decode_step_features_count_every_sequence_and_its_context(latency) -> None:  # type: ignore[no-untyped-def]
    rep = make_replica(latency, block_size=16)
    rep.add_request(SimRequest("a", 100, 10))
    rep.add_request(SimRequest("b", 200, 10))
    rep.update_from_output(rep.schedule())
    for step in range(3):
        plan = rep.schedule()
        # the token computed now attends to all computed tokens and itself
        assert plan.batch == StepBatch(
            num_decode_seqs=2, decode_context_tokens=(101 + step) + (201 + step)
        )
        rep.update_from_output(plan)
    horizon = rep.decode_horizon()
    assert horizon == 10 - 4
    times = rep.decode_run_times_s(horizon)
    assert times[0] == pytest.approx(decode_price(2, 104 + 204))
    assert times[1] - times[0] == pytest.approx(decode_price(2, 105 + 205))
