"""Specs shipped as JSON files under cpsim/data/<kind>/: listing, reading and key checking."""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The repository's profile folder (here, not in profiles.py: a compiled module's __file__ is
# not its source's path, see cpsim/compiled.py).
PROFILE_DIR = Path(__file__).resolve().parent.parent / "conf" / "profile"


def data_names(kind: str) -> list[str]:
    """Short names of the files of one kind (``models``, ``gpus``)."""
    folder = resources.files("cpsim").joinpath(f"data/{kind}")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def read_data(kind: str, name: str, what: str) -> dict[str, Any]:
    """A JSON path as given, else the packaged file ``name``; unknown names list the known."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    entry = resources.files("cpsim").joinpath(f"data/{kind}/{name}.json")
    if not entry.is_file():
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(data_names(kind))}")
    loaded: dict[str, Any] = json.loads(entry.read_text())
    return loaded


def from_known_keys(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)`` after checking every key is a field of the dataclass ``cls``."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; allowed: {sorted(known)}")
    return cls(**data)
