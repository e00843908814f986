"""Routers: table-driven choices on hand-made instance views, and the properties each promises."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpsim.prefix import prompt_block_hashes
from cpsim.types import ExecutionInstanceType, RequestMetadata
from cpsim.views import InstanceView
from policies import ROUTERS, make_router
from policies.routing.affinity import AffinityRouter
from policies.routing.load_balanced import LoadBalancedRouter
from policies.routing.locality import AdapterAffinityRouter, LocalityRouter, stable_hash
from policies.routing.power_of_two import PowerOfTwoRouter
from policies.routing.prefix_cache_aware import PrefixCacheAwareRouter
from policies.routing.prefix_index import PrefixIndex
from policies.routing.random import RandomRouter
from policies.routing.ranking import load_key, pick_least_loaded
from policies.routing.scorers import KVUsageScorer, LoadScorer, PendingPrefillScorer, ScoringRouter
from policies.routing.weighted_round_robin import WeightedRoundRobinRouter

ROUTER_YAMLS = sorted((Path(__file__).resolve().parents[2] / "conf" / "router").glob("*.yaml"))

Views = Callable[..., Any]


def views(make_instance: Views, specs: list[dict[str, Any]]) -> list[Any]:
    return [make_instance(**spec) for spec in specs]


def ids(choices: list[Any]) -> list[str]:
    return [c.instance_id for c in choices]


# ---------------------------------------------------------------- every router


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_no_candidates_gives_none(name: str, make_request: Views) -> None:
    assert make_router(name).route(make_request(), [], 0.0) is None


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_picks_among_candidates(
    name: str, make_request: Views, make_instance: Views
) -> None:
    router = make_router(name)
    cands = views(make_instance, [{"instance_id": f"i{k}", "in_flight": k} for k in range(4)])
    for n in range(20):
        choice = router.route(make_request(f"r{n}", user_id=f"u{n % 5}"), cands, float(n))
        assert choice in cands


def test_unknown_router_lists_the_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"unknown router 'fastest'.*load_balanced"):
        make_router("fastest")


@pytest.mark.parametrize("path", ROUTER_YAMLS, ids=lambda p: p.stem)
def test_yaml_builds_the_registered_router(path: Path, from_yaml: Callable[..., Any]) -> None:
    router, cls, _ = from_yaml(path)
    assert ROUTERS[path.stem] is cls
    assert router.name == path.stem


def test_every_router_has_a_yaml() -> None:
    assert {p.stem for p in ROUTER_YAMLS} == set(ROUTERS)


# ---------------------------------------------------------------- parallelism hint on ties

HINT_ROUTERS: dict[str, Callable[[], Any]] = {
    "load_balanced": LoadBalancedRouter,
    "power_of_two": lambda: PowerOfTwoRouter(seed=3),
    "weighted_round_robin": lambda: WeightedRoundRobinRouter(weights={"a": 1.0, "b": 1.0}),
    "affinity": AffinityRouter,
    "prefix_cache_aware": PrefixCacheAwareRouter,
    "scoring": lambda: ScoringRouter([(LoadScorer(), 1.0)]),
}


@pytest.mark.parametrize(
    ("hint", "b_layout", "expected"),
    [
        (None, {}, "a"),
        ("tensor_parallel", {"tensor_parallel_size": 2}, "b"),
        ("pipeline_parallel", {"pipeline_parallel_size": 2}, "b"),
        ("tensor_parallel", {"pipeline_parallel_size": 2}, "a"),
        ("hybrid", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, "b"),
    ],
)
@pytest.mark.parametrize("router_name", sorted(HINT_ROUTERS))
def test_parallelism_hint_breaks_ties(
    router_name: str,
    hint: str | None,
    b_layout: dict[str, int],
    expected: str,
    make_request: Views,
    make_instance: Views,
) -> None:
    cands = [make_instance("a"), make_instance("b", **b_layout)]
    choice = HINT_ROUTERS[router_name]().route(make_request(parallelism_hint=hint), cands, 0.0)
    assert choice.instance_id == expected


def test_hint_does_not_override_load(make_request: Views, make_instance: Views) -> None:
    cands = [make_instance("a"), make_instance("b", in_flight=3, tensor_parallel_size=2)]
    req = make_request(parallelism_hint="tensor_parallel")
    assert LoadBalancedRouter().route(req, cands, 0.0).instance_id == "a"


# ---------------------------------------------------------------- load balanced

LOAD_BALANCED_CASES = [
    ("fewest in flight", [{"in_flight": 3}, {"in_flight": 1}, {"in_flight": 2}], "i1"),
    (
        "relative to capacity",
        [
            {"in_flight": 4, "max_concurrent_requests": 8},
            {"in_flight": 6, "max_concurrent_requests": 20},
        ],
        "i1",
    ),
    (
        "engine's own queue counts",
        [{"in_flight": 1, "num_running": 3, "num_waiting": 2}, {"in_flight": 2}],
        "i1",
    ),
    (
        "pending prefill breaks ties",
        [
            {"in_flight": 1, "pending_prefill_tokens": 900},
            {"in_flight": 1, "pending_prefill_tokens": 10},
        ],
        "i1",
    ),
    (
        "kv usage breaks remaining ties",
        [
            {"in_flight": 1, "kv_cache_usage_frac": 0.7},
            {"in_flight": 1, "kv_cache_usage_frac": 0.2},
        ],
        "i1",
    ),
    ("full tie: first candidate", [{"in_flight": 2}, {"in_flight": 2}], "i0"),
]


@pytest.mark.parametrize(
    ("case", "specs", "expected"), LOAD_BALANCED_CASES, ids=[c[0] for c in LOAD_BALANCED_CASES]
)
def test_load_balanced(
    case: str, specs: list[dict[str, Any]], expected: str, make_request: Views, make_instance: Views
) -> None:
    cands = [make_instance(f"i{k}", **spec) for k, spec in enumerate(specs)]
    assert LoadBalancedRouter().route(make_request(), cands, 0.0).instance_id == expected


# ---------------------------------------------------------------- random and power of two


@pytest.mark.parametrize("cls", [RandomRouter, PowerOfTwoRouter])
def test_same_seed_same_choices(cls: type, make_request: Views, make_instance: Views) -> None:
    cands = [make_instance(f"i{k}", in_flight=k % 2) for k in range(5)]

    def run(router: Any) -> list[str]:
        return ids([router.route(make_request(f"r{n}"), cands, 0.0) for n in range(50)])

    assert run(cls(seed=11)) == run(cls(seed=11))
    assert run(cls(seed=11)) == run(cls(rng=np.random.default_rng(11)))
    assert run(cls(seed=11)) != run(cls(seed=12))


def test_random_is_roughly_uniform(make_request: Views, make_instance: Views) -> None:
    cands = [make_instance(f"i{k}") for k in range(3)]
    router = RandomRouter(seed=5)
    counts = Counter(router.route(make_request(), cands, 0.0).instance_id for _ in range(3000))
    assert set(counts) == {"i0", "i1", "i2"}
    assert all(850 < n < 1150 for n in counts.values()), counts


def test_power_of_two_never_picks_the_most_loaded_of_three(
    make_request: Views, make_instance: Views
) -> None:
    cands = [
        make_instance("idle"),
        make_instance("busy", in_flight=9),
        make_instance("some", in_flight=4),
    ]
    router = PowerOfTwoRouter(seed=1)
    counts = Counter(router.route(make_request(), cands, 0.0).instance_id for _ in range(300))
    assert counts["busy"] == 0
    assert counts["idle"] > counts["some"] > 0  # idle wins 2 of 3 pairs, some 1 of 3


@pytest.mark.parametrize(("cls", "bad"), [(RandomRouter, -1), (PowerOfTwoRouter, 1.5)])
def test_seed_is_validated(cls: type, bad: Any) -> None:
    with pytest.raises(ValueError, match="seed"):
        cls(seed=bad)


# ---------------------------------------------------------------- weighted round robin


@pytest.mark.parametrize(
    ("weights", "layouts", "expected_share"),
    [
        ({"a": 1.0, "b": 2.0, "c": 3.0}, [{}, {}, {}], {"a": 1, "b": 2, "c": 3}),
        ({"a": 5.0, "b": 5.0}, [{}, {}], {"a": 1, "b": 1}),
        (
            None,
            [{}, {"tensor_parallel_size": 2}, {"max_concurrent_requests": 30}],
            {"a": 1, "b": 2, "c": 3},
        ),
    ],
)
def test_weighted_round_robin_is_proportional(
    weights: dict[str, float] | None,
    layouts: list[dict[str, Any]],
    expected_share: dict[str, int],
    make_request: Views,
    make_instance: Views,
) -> None:
    cands = [make_instance(name, **lay) for name, lay in zip("abc", layouts, strict=False)]
    router = WeightedRoundRobinRouter(weights=weights)
    cycle = sum(expected_share.values())
    picks = ids([router.route(make_request(), cands, 0.0) for _ in range(100 * cycle)])
    assert Counter(picks) == {k: 100 * v for k, v in expected_share.items()}
    # smooth: every window of one cycle holds each instance exactly its share
    for start in range(0, len(picks) - cycle, 7):
        assert Counter(picks[start : start + cycle]) == expected_share


def test_weighted_round_robin_missing_weight_uses_default(
    make_request: Views, make_instance: Views
) -> None:
    cands = [make_instance("a"), make_instance("z")]
    router = WeightedRoundRobinRouter(weights={"a": 3.0}, default_weight=1.0)
    picks = Counter(ids([router.route(make_request(), cands, 0.0) for _ in range(400)]))
    assert picks == {"a": 300, "z": 100}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"weights": {"a": 0.0}}, "weights\\['a'\\]"), ({"default_weight": -1.0}, "default_weight")],
)
def test_weighted_round_robin_validates(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        WeightedRoundRobinRouter(**kwargs)


# ---------------------------------------------------------------- affinity

# (user, in_flight of a and b, which are candidates, expected choice)
AFFINITY_STEPS: list[tuple[str, dict[str, int], str, str]] = [
    ("u1", {"a": 0, "b": 0}, "ab", "a"),  # first sight: least loaded (tie: first), pinned to a
    ("u1", {"a": 5, "b": 0}, "ab", "a"),  # sticks although b is idle
    ("u2", {"a": 5, "b": 0}, "ab", "b"),  # another user: least loaded
    ("u1", {"a": 8, "b": 1}, "ab", "b"),  # a at 0.8 = max_load_frac: overloaded, re-pinned to b
    ("u1", {"a": 0, "b": 6}, "ab", "b"),  # the new pin sticks
    ("u2", {"a": 0, "b": 6}, "a", "a"),  # pinned b is not a candidate (full/unhealthy): re-pin
    ("u2", {"a": 3, "b": 0}, "ab", "a"),  # and it sticks
    ("anonymous", {"a": 3, "b": 0}, "ab", "b"),  # anonymous users are never pinned
    ("anonymous", {"a": 0, "b": 3}, "ab", "a"),
]


def test_affinity_sticks_and_repins(make_request: Views, make_instance: Views) -> None:
    router = AffinityRouter(max_load_frac=0.8)
    for step, (user, loads, present, expected) in enumerate(AFFINITY_STEPS):
        cands = [make_instance(i, in_flight=loads[i]) for i in present]
        choice = router.route(make_request(f"r{step}", user_id=user), cands, float(step))
        assert choice.instance_id == expected, f"step {step}"
    assert router.pins == {"u1": "b", "u2": "a"}


def test_affinity_pin_table_is_bounded(make_request: Views, make_instance: Views) -> None:
    router = AffinityRouter(max_pinned_users=3)
    for n in range(10):
        router.route(make_request(user_id=f"u{n}"), [make_instance()], 0.0)
    assert list(router.pins) == ["u7", "u8", "u9"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_load_frac": 1.5}, "max_load_frac"), ({"max_pinned_users": 0}, "max_pinned_users")],
)
def test_affinity_validates(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AffinityRouter(**kwargs)


# ---------------------------------------------------------------- locality


def test_stable_hash_is_not_pythons_hash() -> None:
    assert stable_hash(b"cpsim") == 1263631105864119562  # same in every process and run


def prompt(head: int, tail: int, length: int = 300) -> tuple[int, ...]:
    return tuple(head * 1000 + k for k in range(256)) + tuple(
        tail * 1000 + k for k in range(length - 256)
    )


LOCALITY_KEYS = [
    (
        "same first 256 tokens",
        {"prompt_token_ids": prompt(1, 1)},
        {"prompt_token_ids": prompt(1, 2)},
        True,
    ),
    ("block ids", {"prefix_block_ids": (7, 8, 9)}, {"prefix_block_ids": (7, 8, 10)}, False),
    ("user id without ids", {"user_id": "alice"}, {"user_id": "alice"}, True),
]


@pytest.mark.parametrize(
    ("case", "first", "second", "same_expected"), LOCALITY_KEYS, ids=[c[0] for c in LOCALITY_KEYS]
)
def test_locality_same_prefix_same_instance(
    case: str,
    first: dict[str, Any],
    second: dict[str, Any],
    same_expected: bool,
    make_request: Views,
    make_instance: Views,
) -> None:
    cands = [make_instance(f"i{k}") for k in range(4)]
    router = LocalityRouter(prefix_tokens=256)
    a = router.route(make_request("r1", **first), cands, 0.0)
    again = LocalityRouter(prefix_tokens=256).route(make_request("r2", **first), cands[::-1], 0.0)
    assert a == again  # independent of candidate order and of the router object
    b = router.route(make_request("r3", **second), cands, 0.0)
    if same_expected:
        assert a == b


def test_locality_block_ids_cut_at_prefix_tokens(make_request: Views, make_instance: Views) -> None:
    cands = [make_instance(f"i{k}") for k in range(4)]
    router = LocalityRouter(prefix_tokens=1024)  # 2 blocks of 512 tokens
    first = router.route(make_request(prefix_block_ids=(7, 8, 9)), cands, 0.0)
    assert all(
        router.route(make_request(prefix_block_ids=(7, 8, tail)), cands, 0.0) == first
        for tail in range(20)
    )


def test_locality_spreads_distinct_prefixes(make_request: Views, make_instance: Views) -> None:
    cands = [make_instance(f"i{k}") for k in range(4)]
    router = LocalityRouter()
    counts = Counter(
        router.route(make_request(user_id=f"u{n}"), cands, 0.0).instance_id for n in range(400)
    )
    assert set(counts) == {"i0", "i1", "i2", "i3"}
    assert min(counts.values()) > 50


def test_locality_removing_an_instance_moves_only_its_keys(
    make_request: Views, make_instance: Views
) -> None:
    router = LocalityRouter()
    four = [make_instance(f"i{k}") for k in range(4)]
    users = [f"u{n}" for n in range(200)]
    before = {u: router.route(make_request(user_id=u), four, 0.0).instance_id for u in users}
    after = {u: router.route(make_request(user_id=u), four[:3], 0.0).instance_id for u in users}
    moved = {u for u in users if before[u] != after[u]}
    assert moved == {u for u in users if before[u] == "i3"}


def test_locality_spills_past_bounded_load(make_request: Views, make_instance: Views) -> None:
    router = LocalityRouter(epsilon=0.25)
    idle = [make_instance(f"i{k}") for k in range(4)]
    home = router.route(make_request(user_id="hot"), idle, 0.0).instance_id
    # bound = ceil(1.25 x (total + 1) / 4); with home at 3 and the rest at 1: ceil(1.25 x 7 / 4) = 3
    loaded = [
        make_instance(v.instance_id, in_flight=3 if v.instance_id == home else 1) for v in idle
    ]
    spilled = router.route(make_request(user_id="hot"), loaded, 0.0).instance_id
    assert spilled != home
    # all at 1: the bound is ceil(1.25 x 5 / 4) = 2, home has room and keeps the request
    within = [make_instance(v.instance_id, in_flight=1) for v in idle]
    assert router.route(make_request(user_id="hot"), within, 0.0).instance_id == home
    # the spill target is stable: the next instance clockwise on the ring
    assert router.route(make_request(user_id="hot"), loaded, 0.0).instance_id == spilled


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prefix_tokens": 0}, "prefix_tokens"),
        ({"virtual_nodes": -1}, "virtual_nodes"),
        ({"epsilon": -0.1}, "epsilon"),
    ],
)
def test_locality_validates(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LocalityRouter(**kwargs)


# ---------------------------------------------------------------- prompt block hashes


def test_block_hashes_chain_prefixes() -> None:
    a = prompt_block_hashes(RequestMetadata("a", prompt_token_ids=(1, 2, 3, 4, 5, 6, 7)), 2)
    b = prompt_block_hashes(RequestMetadata("b", prompt_token_ids=(1, 2, 3, 9, 5, 6)), 2)
    assert len(a) == 3  # the partial last block is not hashed
    assert a[0] == b[0] and a[1] != b[1]
    assert a[2] != b[2]  # equal block (5, 6) after a different one: different hash


def test_block_hashes_from_trace_block_ids() -> None:
    a = prompt_block_hashes(RequestMetadata("a", prefix_block_ids=(4, 5, 6)), 16)
    b = prompt_block_hashes(RequestMetadata("b", prefix_block_ids=(4, 5, 7)), 16)
    tokens = prompt_block_hashes(RequestMetadata("c", prompt_token_ids=(4,) * 16), 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert tokens[0] != a[0]  # the two kinds of blocks never collide
    assert prompt_block_hashes(RequestMetadata("d", num_prompt_tokens=100), 16) == ()


def test_block_hashes_are_stable_across_runs() -> None:
    meta = RequestMetadata("x", prompt_token_ids=(0, 1, 2, 3))
    assert prompt_block_hashes(meta, 2) == (14172243950798548941, 4326082948443634926)
    with pytest.raises(ValueError, match="block_size_tokens"):
        prompt_block_hashes(meta, 0)


# ---------------------------------------------------------------- prefix cache aware

SYSTEM = tuple(range(64))  # 4 blocks of 16 shared tokens


def test_prefix_cache_aware_follows_the_prefix_then_spreads(
    make_request: Views, make_instance: Views
) -> None:
    router = PrefixCacheAwareRouter(block_size_tokens=16, max_load_gap_frac=0.2)
    idle = [make_instance("a"), make_instance("b")]
    assert router.route(make_request("r1", prompt_token_ids=SYSTEM), idle, 0.0).instance_id == "a"
    # a saw the prefix: it wins although it is a little busier
    slightly = [make_instance("a", in_flight=2), make_instance("b")]
    assert (
        router.route(make_request("r2", prompt_token_ids=SYSTEM), slightly, 0.0).instance_id == "a"
    )
    # a prompt nobody saw goes to the less loaded
    other = tuple(range(500, 564))
    assert (
        router.route(make_request("r3", prompt_token_ids=other), slightly, 0.0).instance_id == "b"
    )
    # too busy (gap 0.3 > 0.2): the hot prefix spills to b, which then holds it too
    busy = [make_instance("a", in_flight=3), make_instance("b")]
    assert router.route(make_request("r4", prompt_token_ids=SYSTEM), busy, 0.0).instance_id == "b"
    assert (
        router.index.matched_blocks(
            "b", prompt_block_hashes(make_request(prompt_token_ids=SYSTEM).meta, 16)
        )
        == 4
    )


@pytest.mark.parametrize(
    ("prefix_weight", "load_weight", "b_in_flight", "expected"),
    [
        (1.0, 1.0, 1, "a"),  # a: (1 x 0.5 + 1 x 0.9) / 2 = 0.7 beats b: (0 + 1) / 2 = 0.5
        (1.0, 0.0, 0, "a"),  # prefix only
        (0.0, 1.0, 0, "b"),  # load only: b is idle
        (0.1, 1.0, 0, "b"),  # a: (0.05 + 0.9) / 1.1 < b: 1 / 1.1
        (0.3, 1.0, 0, "a"),  # a: (0.15 + 0.9) / 1.3 > b: 1 / 1.3
    ],
)
def test_prefix_cache_aware_weights(
    prefix_weight: float,
    load_weight: float,
    b_in_flight: int,
    expected: str,
    make_request: Views,
    make_instance: Views,
) -> None:
    router = PrefixCacheAwareRouter(prefix_weight=prefix_weight, load_weight=load_weight)
    router.index.record(
        "a", prompt_block_hashes(make_request(prompt_token_ids=SYSTEM[:32]).meta, 16)
    )
    cands = [make_instance("a", in_flight=1), make_instance("b", in_flight=b_in_flight)]
    choice = router.route(
        make_request(prompt_token_ids=SYSTEM), cands, 0.0
    )  # half the blocks hit on a
    assert choice.instance_id == expected


def test_prefix_cache_aware_uses_trace_block_ids(make_request: Views, make_instance: Views) -> None:
    router = PrefixCacheAwareRouter()
    cands = [make_instance("a"), make_instance("b")]
    router.route(make_request("r1", prefix_block_ids=(1, 2, 3)), cands[::-1], 0.0)  # goes to b
    assert (
        router.route(make_request("r2", prefix_block_ids=(1, 2, 4)), cands, 0.0).instance_id == "b"
    )


def test_prefix_index_is_an_lru() -> None:
    index = PrefixIndex(capacity_blocks=4)
    index.record("a", [1, 2, 3, 4])
    index.record("a", [1])  # touch 1
    index.record("a", [5, 6])  # evicts 2 and 3
    assert index.num_blocks("a") == 4
    assert index.matched_blocks("a", [1, 2]) == 1
    assert index.matched_blocks("a", [5, 6, 1]) == 3
    assert index.matched_blocks("zzz", [1]) == 0


# ---------------------------------------------------------------- scorers


@pytest.mark.parametrize(
    ("scorer", "specs", "expected"),
    [
        (LoadScorer(), [{"in_flight": 0}, {"in_flight": 5}, {"in_flight": 12}], [1.0, 0.5, 0.0]),
        (
            KVUsageScorer(),
            [{"kv_cache_usage_frac": 0.25}, {"kv_cache_usage_frac": 1.0}],
            [0.75, 0.0],
        ),
        (
            PendingPrefillScorer(),
            [
                {"pending_prefill_tokens": 0},
                {"pending_prefill_tokens": 400},
                {"pending_prefill_tokens": 100},
            ],
            [1.0, 0.0, 0.75],
        ),
        (PendingPrefillScorer(), [{}, {}], [1.0, 1.0]),
    ],
)
def test_scorers(
    scorer: Any,
    specs: list[dict[str, Any]],
    expected: list[float],
    make_request: Views,
    make_instance: Views,
) -> None:
    cands = [make_instance(f"i{k}", **spec) for k, spec in enumerate(specs)]
    assert scorer.score(make_request(), cands) == pytest.approx(expected)


def test_scoring_router_weighs_scorers(make_request: Views, make_instance: Views) -> None:
    cands = [make_instance("a", in_flight=2), make_instance("b", kv_cache_usage_frac=0.9)]
    by_load = ScoringRouter([(LoadScorer(), 1.0), (KVUsageScorer(), 0.1)])
    by_kv = ScoringRouter([(LoadScorer(), 0.1), (KVUsageScorer(), 1.0)])
    assert by_load.route(make_request(), cands, 0.0).instance_id == "b"
    assert by_kv.route(make_request(), cands, 0.0).instance_id == "a"
    with pytest.raises(ValueError, match="weight"):
        ScoringRouter([(LoadScorer(), -1.0)])
    with pytest.raises(ValueError, match="sum"):
        ScoringRouter([(LoadScorer(), 0.0)])


@given(
    loads=st.lists(
        st.tuples(
            st.integers(0, 4), st.integers(0, 4), st.integers(0, 2), st.sampled_from([0.0, 0.5])
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_least_loaded_loop_picks_what_min_over_load_keys_picks(
    loads: list[tuple[int, int, int, float]],
) -> None:
    # small ranges, so that equal keys (and the earliest-wins rule) come up often
    views = [
        InstanceView(
            f"i{k}", "m", ExecutionInstanceType.GENERAL, True, f, p, 4, r, 0, kv,
            1, 1, 1, 1, 1, "A100-80GB", 80.0, 2.0, None, None,
        )
        for k, (f, r, p, kv) in enumerate(loads)
    ]
    assert pick_least_loaded(views, None) is min(views, key=load_key)


def test_lora_affinity_keeps_an_adapter_together_and_spreads_adapters(
    make_request: Views, make_instance: Views
) -> None:
    served = frozenset(f"a{k}" for k in range(40))
    idle = [make_instance(f"i{k}", adapters=served) for k in range(4)]
    router = AdapterAffinityRouter()
    home = {
        a: router.route(make_request(f"r{a}", model_name=a), idle, 0.0).instance_id
        for a in sorted(served)
    }
    # an adapter's requests meet on one instance, whatever the order of the candidates
    assert all(
        router.route(make_request("again", model_name=a), idle[::-1], 0.0).instance_id == home[a]
        for a in served
    )
    assert set(home.values()) == {"i0", "i1", "i2", "i3"}  # the adapters are spread
    # past the load bound the adapter spills to the next instance on the ring, which stays
    load = {v.instance_id: 3 if v.instance_id == home["a0"] else 1 for v in idle}
    loaded = [make_instance(i, adapters=served, in_flight=n) for i, n in load.items()]
    spilled = router.route(make_request("hot", model_name="a0"), loaded, 0.0).instance_id
    assert spilled != home["a0"]
    assert router.route(make_request("hot2", model_name="a0"), loaded, 0.0).instance_id == spilled


def test_lora_affinity_sends_base_model_requests_to_the_least_loaded(
    make_request: Views, make_instance: Views
) -> None:
    cands = [make_instance(f"i{k}", in_flight=k, adapters=frozenset({"sql"})) for k in (2, 0, 1)]
    router = AdapterAffinityRouter()
    for model in (None, "m"):
        assert router.route(make_request(model_name=model), cands, 0.0).instance_id == "i0"
    assert router.route(make_request(), [], 0.0) is None
