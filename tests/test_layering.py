"""The layering rules of DESIGN.md, checked by reading every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICY_FORBIDDEN = {
    "simpy",
    "asyncio",
    "vllm",
    "time",
    "random",
    "threading",
    "backends",
    "experiments",
    "aiohttp",
    "httpx",
    "requests",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str, rule) -> list[str]:
    bad = []
    for path in files(package):
        for name in imports_of(path):
            reason = rule(path, name)
            if reason:
                bad.append(f"{path.relative_to(ROOT)} imports {name}: {reason}")
    return bad


def core_rule(path: Path, name: str) -> str | None:
    if path.name == "manager.py":
        return "the facade may not import experiments" if top(name) == "experiments" else None
    if top(name) in {"policies", "backends", "experiments"}:
        return (
            "cpsim/ must not import policies, backends or experiments (only cpsim/manager.py may)"
        )
    return None


def policy_rule(path: Path, name: str) -> str | None:
    if top(name) in POLICY_FORBIDDEN:
        return "a policy is pure: no I/O, clocks, global randomness or backends"
    return None


def backend_rule(path: Path, name: str) -> str | None:
    rel = path.relative_to(ROOT / "backends").parts
    if top(name) == "experiments":
        return "nothing imports experiments"
    if rel[0] == "sim" and name.startswith("backends.vllm"):
        return "backends/sim must not import backends/vllm"
    if rel[0] == "vllm" and name.startswith("backends.sim"):
        return "backends/vllm must not import backends/sim"
    return None


@pytest.mark.parametrize(
    ("package", "rule"),
    [("cpsim", core_rule), ("policies", policy_rule), ("backends", backend_rule)],
)
def test_layering(package: str, rule) -> None:
    assert files(package), f"no Python files under {package}/"
    assert violations(package, rule) == []


def test_rules_catch_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import simpy\nfrom backends.sim import x\n")
    assert policy_rule(bad, "simpy")
    assert core_rule(bad, "backends.sim")
    assert imports_of(bad) == {"simpy", "backends.sim"}
