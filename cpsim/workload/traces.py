"""Readers for public request traces (Azure LLM 2023 CSV, Mooncake JSONL, ShareGPT stats CSV)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from cpsim.validation import lookup

TRACE_DIR_ENV = "CPSIM_TRACE_DIR"
TRACE_FORMATS = ("azure", "mooncake", "sharegpt")

IntArray: TypeAlias = np.ndarray[Any, np.dtype[np.int64]]
FloatArray: TypeAlias = np.ndarray[Any, np.dtype[np.float64]]


def default_trace_dir() -> Path:
    """``$CPSIM_TRACE_DIR`` if set, else ``<repo>/../shared/traces``."""
    override = os.environ.get(TRACE_DIR_ENV)
    if override:
        return Path(override)
    repo = Path(__file__).resolve().parents[2]
    return (repo.parent / "shared" / "traces").resolve()


def resolve_trace_path(path: str | os.PathLike[str]) -> Path:
    """An absolute path as given; a relative one is taken inside ``default_trace_dir()``."""
    given = Path(path)
    return given if given.is_absolute() else default_trace_dir() / given


@dataclass(frozen=True, eq=False)
class TraceTable:
    """A trace in columns. ``arrival_s`` is seconds from the first row (None: lengths only);
    ``hash_ids`` are the prompt's 512-token block ids per row (None where the format has none)."""

    path: str
    format: str
    prompt_tokens: IntArray
    output_tokens: IntArray
    arrival_s: FloatArray | None = None
    hash_ids: tuple[tuple[int, ...], ...] | None = None

    def __len__(self) -> int:
        return int(self.prompt_tokens.size)

    @property
    def mean_rate_rps(self) -> float | None:
        """Arrivals per second over the span from the first to the last row."""
        if self.arrival_s is None or len(self) < 2:
            return None
        span_s = float(self.arrival_s[-1] - self.arrival_s[0])
        return (len(self) - 1) / span_s if span_s > 0 else None


class _RowError(ValueError):
    """A row's problem, without the location (the reader adds path and line)."""


def _count(row: dict[str, Any], key: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or value is None:
        raise _RowError(f"{key}={value!r} must be an integer >= 0")
    try:
        number = int(value) if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        raise _RowError(f"{key}={value!r} must be an integer >= 0") from None
    if number < 0:
        raise _RowError(f"{key}={value!r} must be an integer >= 0")
    return number


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row, after checking the header names ``required``."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(
                f"{path}:1: header {header!r} lacks column(s) {missing}; expected {list(required)}"
            )
        for row in reader:
            if None in row or any(row.get(name) is None for name in header):
                raise ValueError(
                    f"{path}:{reader.line_num}: expected {len(header)} comma-separated fields "
                    f"({', '.join(header)})"
                )
            yield reader.line_num, row


def _located(path: Path, line_no: int, error: Exception) -> ValueError:
    return ValueError(f"{path}:{line_no}: {error}")


def _read_azure(path: Path) -> TraceTable:
    prompts: list[int] = []
    outputs: list[int] = []
    stamps: list[float] = []
    for line_no, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            try:
                stamp = datetime.fromisoformat(row["TIMESTAMP"].strip())
            except ValueError:
                raise _RowError(
                    f"TIMESTAMP={row['TIMESTAMP']!r} is not a date-time like "
                    "'2023-11-16 18:15:46.6805900'"
                ) from None
            prompts.append(_count(row, "ContextTokens"))
            outputs.append(_count(row, "GeneratedTokens"))
        except _RowError as error:
            raise _located(path, line_no, error) from None
        stamps.append(stamp.timestamp())
    return _table(path, "azure", prompts, outputs, stamps, None)


def _read_sharegpt(path: Path) -> TraceTable:
    prompts: list[int] = []
    outputs: list[int] = []
    for line_no, row in _csv_rows(path, ("num_prefill_tokens", "num_decode_tokens")):
        try:
            prompts.append(_count(row, "num_prefill_tokens"))
            outputs.append(_count(row, "num_decode_tokens"))
        except _RowError as error:
            raise _located(path, line_no, error) from None
    return _table(path, "sharegpt", prompts, outputs, None, None)


def _mooncake_row(line: str) -> tuple[float, int, int, tuple[int, ...]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise _RowError(f"not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    stamp = row.get("timestamp")
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or stamp < 0:
        raise _RowError(f"timestamp={stamp!r} must be a number of milliseconds >= 0")
    ids = row.get("hash_ids", [])
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise _RowError(f"hash_ids={ids!r} must be a list of integers")
    return (
        float(stamp) / 1000.0,
        _count(row, "input_length"),
        _count(row, "output_length"),
        tuple(ids),
    )


def _read_mooncake(path: Path) -> TraceTable:
    prompts: list[int] = []
    outputs: list[int] = []
    stamps: list[float] = []
    blocks: list[tuple[int, ...]] = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                stamp, prompt, output, ids = _mooncake_row(line)
            except _RowError as error:
                raise _located(path, line_no, error) from None
            stamps.append(stamp)
            prompts.append(prompt)
            outputs.append(output)
            blocks.append(ids)
    return _table(path, "mooncake", prompts, outputs, stamps, tuple(blocks))


def _table(
    path: Path,
    fmt: str,
    prompts: list[int],
    outputs: list[int],
    stamps: list[float] | None,
    blocks: tuple[tuple[int, ...], ...] | None,
) -> TraceTable:
    if not prompts:
        raise ValueError(f"{path}: no request rows in this {fmt} trace")
    prompt_arr = np.asarray(prompts, dtype=np.int64)
    output_arr = np.asarray(outputs, dtype=np.int64)
    if stamps is None:
        return TraceTable(str(path), fmt, prompt_arr, output_arr, None, blocks)
    times = np.asarray(stamps, dtype=np.float64)
    if np.any(np.diff(times) < 0):
        # Replays need time order; a stable sort keeps the file order of equal times.
        order = np.argsort(times, kind="stable")
        times, prompt_arr, output_arr = times[order], prompt_arr[order], output_arr[order]
        blocks = tuple(blocks[i] for i in order.tolist()) if blocks is not None else None
    return TraceTable(str(path), fmt, prompt_arr, output_arr, times - times[0], blocks)


_READERS: dict[str, Callable[[Path], TraceTable]] = {
    "azure": _read_azure,
    "mooncake": _read_mooncake,
    "sharegpt": _read_sharegpt,
}


def detect_format(path: Path) -> str:
    """``mooncake`` for JSON lines; for CSV, by header (``TIMESTAMP`` or ``num_prefill_tokens``)."""
    with path.open() as handle:
        first = handle.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    header = first.split(",")
    if "TIMESTAMP" in header:
        return "azure"
    if "num_prefill_tokens" in header:
        return "sharegpt"
    raise ValueError(
        f"{path}:1: cannot tell the trace format from {first[:80]!r}; pass format= one of "
        f"{', '.join(TRACE_FORMATS)}"
    )


def load_trace(path: str | os.PathLike[str], format: str = "auto") -> TraceTable:
    """Read a whole trace (a relative ``path`` is inside ``default_trace_dir()``).

    Raises ValueError naming the file and line of the first malformed row.
    """
    resolved = resolve_trace_path(path)
    if not resolved.is_file():
        raise ValueError(
            f"trace path={str(path)!r} not found (looked at {resolved}); set {TRACE_DIR_ENV} "
            "or give an absolute path"
        )
    fmt = detect_format(resolved) if format == "auto" else format
    reader = lookup(_READERS, fmt, "trace format")
    return reader(resolved)
