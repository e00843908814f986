"""KVBalancePolicy, table-driven: which decodes move where, and when nothing moves."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cpsim.types import ExecutionInstanceType
from cpsim.views import DecodeView, InstanceView
from policies.migration import make_migration_policy
from policies.migration.kv_balance import KVBalancePolicy


def view(
    iid: str, *, waiting: int = 0, healthy: bool = True, kind: str = "general"
) -> InstanceView:
    return InstanceView(
        iid, "m", ExecutionInstanceType(kind), healthy, 0, 0, 64, 0, waiting, 0.0,
        1, 1, 1, 1, 1, "A100", 80.0, 1.0, None, None,
    )  # fmt: skip


def decodes(iid: str, *shares: float, context: int = 100, remaining: int = 100) -> list[DecodeView]:
    """Decodes of the given KV shares; longer contexts for later ones."""
    return [
        DecodeView(f"{iid}-{k}", iid, context + k, remaining, share)
        for k, share in enumerate(shares)
    ]


@dataclass
class Case:
    instances: list[InstanceView]
    decoding: dict[str, list[DecodeView]]
    moves: list[tuple[str, str]]
    policy: dict[str, float] = field(default_factory=dict)


CASES = {
    "balanced: nothing moves": Case(
        [view("a"), view("b")], {"a": decodes("a", 0.4), "b": decodes("b", 0.4)}, []
    ),
    # a at 0.95, b at 0.2: the shortest decodes go until the two would cross
    "full to empty, shortest first, until they would cross": Case(
        [view("a"), view("b")],
        {"a": decodes("a", 0.15, 0.2, 0.3, 0.3), "b": decodes("b", 0.2)},
        [("a-0", "b"), ("a-1", "b")],
    ),
    # a's queue counts: 0.5 held by 2 decodes, 2 waiting -> virtual usage 1.0
    "a queue makes an instance a source": Case(
        [view("a", waiting=2), view("b")],
        {"a": decodes("a", 0.25, 0.25), "b": decodes("b", 0.1)},
        [("a-0", "b")],
    ),
    "a decode near its end does not move": Case(
        [view("a"), view("b")],
        {"a": decodes("a", 0.45, 0.5, remaining=10), "b": []},
        [],
    ),
    "no target below low_usage": Case(
        [view("a"), view("b")], {"a": decodes("a", 0.95), "b": decodes("b", 0.7)}, []
    ),
    "an unhealthy or prefill instance is no target": Case(
        [view("a"), view("b", healthy=False), view("p", kind="prefilling")],
        {"a": decodes("a", 0.5, 0.45), "b": [], "p": []},
        [],
    ),
    # two sources, two targets: the fullest pairs with the emptiest
    "fullest with emptiest": Case(
        [view("a"), view("b"), view("c"), view("d")],
        {
            "a": decodes("a", 0.2, 0.75),
            "b": decodes("b", 0.5, 0.5),
            "c": decodes("c", 0.3),
            "d": [],
        },
        [("b-0", "d"), ("a-0", "c")],
    ),
    "at most max_per_pair": Case(
        [view("a"), view("b")],
        {"a": decodes("a", *[0.1] * 10), "b": []},
        [("a-0", "b")],
        {"max_per_pair": 1},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kv_balance_moves(name: str) -> None:
    case = CASES[name]
    policy = KVBalancePolicy(**case.policy)  # type: ignore[arg-type]
    assert policy.plan(case.instances, case.decoding, 0.0) == case.moves


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"high_usage": -0.1}, "high_usage"),
        ({"low_usage": 0.95}, "low_usage"),
        ({"min_remaining_tokens": 0}, "min_remaining_tokens"),
        ({"max_per_pair": 0}, "max_per_pair"),
        ({"interval_s": 0}, "interval_s"),
    ],
)
def test_bad_settings_name_the_value(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVBalancePolicy(**kwargs)  # type: ignore[arg-type]


def test_the_registry_builds_it_and_names_what_is_allowed() -> None:
    assert isinstance(make_migration_policy("kv_balance"), KVBalancePolicy)
    with pytest.raises(ValueError, match="kv_balance"):
        make_migration_policy("llumnix")
