"""The KV block pool: counts, prefix-cache references, LRU eviction, random-use invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sim.block_manager import BlockPool
from backends.sim.request import SimRequest
from cpsim.profiles import ProfiledLatencyModel
from tests.sim.conftest import COEFFICIENTS, make_replica


def test_allocate_and_release_count_blocks() -> None:
    pool = BlockPool(10)
    pool.allocate(7)
    assert pool.num_free == 3 and pool.usage_frac == pytest.approx(0.7)
    with pytest.raises(RuntimeError):
        pool.allocate(4)
    pool.release(7)
    assert pool.num_free == 10
    with pytest.raises(RuntimeError):
        pool.release(1)


def test_cached_blocks_stay_until_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(6)
    pool.allocate(3)
    for h in (1, 2, 3):
        assert pool.register(h)
    pool.allocate(3)
    for h in (4, 5, 6):
        assert pool.register(h)
    pool.release_cached([1, 2, 3])  # freed first: its tail block (3) goes first
    pool.release_cached([4, 5, 6])
    assert pool.num_free == 6 and pool.num_cached == 6
    assert pool.evictable_hashes() == [3, 2, 1, 6, 5, 4]
    pool.allocate(2)
    assert not pool.is_cached(3) and not pool.is_cached(2) and pool.is_cached(1)
    assert pool.num_evictions == 2


def test_a_hit_takes_a_cached_block_out_of_the_lru() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    pool.register(10)
    pool.register(11)
    pool.release_cached([10, 11])
    assert pool.longest_hit([10, 11, 12], max_blocks=5) == 2
    assert pool.longest_hit([10, 11], max_blocks=1) == 1
    assert pool.num_evictable([10, 11]) == 2
    pool.acquire([10])
    assert pool.num_free == 3 and pool.evictable_hashes() == [11]
    pool.allocate(3)  # uncached blocks first, then 11 is evicted
    assert pool.is_cached(10) and not pool.is_cached(11)
    pool.check()


def test_register_refuses_a_hash_that_is_already_cached() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    assert pool.register(5)
    assert not pool.register(5)


def test_uncached_free_blocks_are_used_before_any_eviction() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    pool.register(9)
    pool.release_cached([9])
    pool.allocate(3)
    assert pool.is_cached(9) and pool.num_evictions == 0


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 120), st.integers(1, 40), st.integers(0, 3)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 4), st.just(0), st.just(0)),
        st.tuples(st.just("run"), st.integers(2, 50), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.integers(8, 60), st.booleans())
def test_blocks_never_negative_nor_above_capacity(ops, num_blocks, chunked) -> None:  # type: ignore[no-untyped-def]
    latency = ProfiledLatencyModel("m", "g", COEFFICIENTS)
    rep = make_replica(latency, num_blocks=num_blocks, block_size=8,
                       max_num_batched_tokens=128, enable_chunked_prefill=chunked, max_num_seqs=5)
    added = 0
    for kind, a, b, prefix in ops:
        if kind == "add":
            if (a + b + 7) // 8 > num_blocks or (not chunked and a + b > 128):
                continue
            hashes = tuple(range(prefix * 100, prefix * 100 + a // 8)) if prefix else ()
            rep.add_request(SimRequest(f"r{added}", a, b, hashes))
            added += 1
        elif kind == "abort":
            rep.abort_request(f"r{a}")
        elif kind == "step":
            for _ in range(a):
                rep.update_from_output(rep.schedule())
        else:
            horizon = rep.decode_horizon()
            if horizon:
                rep.advance_decode(min(a, horizon))
        rep.check()
        assert 0 <= rep.num_free_blocks <= num_blocks
        assert 0.0 <= rep.kv_cache_usage_frac <= 1.0
    while rep.has_work:
        rep.update_from_output(rep.schedule())
        rep.check()
    assert rep.num_free_blocks == num_blocks
