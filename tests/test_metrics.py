"""The per-request record store: chunks, spilling, column types and extras."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cpsim.metrics import RECORD_COLUMNS, RecordStore


def _row(i: int, slo: float | None = 500, reason: str | None = None) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "request_id": f"req-{i}",
        "user_id": f"user-{i % 3}",
        "priority": "NORMAL",
        "status": "COMPLETED" if reason is None else "FAILED",
        "reason": reason,
        "arrival_time_s": 0.5 * i,
        "dispatch_time_s": 0.5 * i,
        "first_token_time_s": 0.5 * i + 0.1,
        "prefill_first_token_time_s": math.nan,
        "kv_transfer_start_s": math.nan,
        "finish_time_s": 0.5 * i + 1.0,
        "queue_delay_ms": 0.0,
        "ttft_ms": 100.0,
        "tpot_ms": 10.0,
        "latency_ms": 1000.0,
        "num_prompt_tokens": 100 + i,
        "num_output_tokens": 10,
        "instance_id": f"gpu-{i % 2}",
        "prefill_instance_id": None,
        "decode_instance_id": None,
        "slo_deadline_ms": math.nan if slo is None else slo,
        "slo_met": None if slo is None else True,
        "cost_usd": 0.001,
        "predicted_cost_usd": math.nan,
        "policy": "fifo",
        "attempts": 1,
        "model_name": "opt-13b",
    }
    return tuple(values[c] for c in RECORD_COLUMNS)


def _fill(store: RecordStore, n: int) -> None:
    for i in range(n):
        extras = {"num_preemptions": 1.0} if i % 4 == 3 else {}
        store.append(_row(i, reason="boom" if i == 5 else None), extras)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1000])
def test_chunked_and_spilled_records_equal_the_records_in_one_chunk(
    chunk_rows: int, tmp_path: Path
) -> None:
    whole = RecordStore()
    _fill(whole, 10)
    expected = whole.frame()
    for spill in (None, tmp_path / f"spill-{chunk_rows}"):
        store = RecordStore(chunk_rows=chunk_rows, spill_dir=spill)
        _fill(store, 10)
        assert len(store) == 10
        pd.testing.assert_frame_equal(store.frame(), expected)
    assert list(expected.columns) == [*RECORD_COLUMNS, "num_preemptions"]


def test_columns_have_fixed_types_whatever_the_values() -> None:
    store = RecordStore()
    _fill(store, 4)  # every SLO an integer number of milliseconds
    frame = store.frame()
    assert frame["slo_deadline_ms"].dtype == np.float64
    assert frame["num_prompt_tokens"].dtype == np.int64
    assert isinstance(frame["status"].dtype, pd.CategoricalDtype)
    assert frame["reason"].isna().all()
    # an extra seen first on the fourth row is NaN on the rows before it
    assert frame["num_preemptions"].isna().tolist() == [True, True, True, False]


def test_a_summary_reads_only_the_columns_it_asks_for(tmp_path: Path) -> None:
    store = RecordStore(chunk_rows=4, spill_dir=tmp_path)
    _fill(store, 10)
    frame = store.frame(["status", "latency_ms"])
    assert list(frame.columns) == ["status", "latency_ms"]
    assert frame["status"].tolist().count("FAILED") == 1


def test_a_record_of_the_wrong_length_is_refused() -> None:
    store = RecordStore()
    with pytest.raises(ValueError, match="a record has 3 values; RECORD_COLUMNS has 27"):
        store.append(("a", "b", "c"), {})
    assert len(store) == 0


def test_an_empty_store_gives_an_empty_frame_with_every_column() -> None:
    frame = RecordStore().frame()
    assert frame.empty and list(frame.columns) == list(RECORD_COLUMNS)


def _expected(rows: list[tuple[Any, ...]], extras: list[dict[str, float]]) -> pd.DataFrame:
    """The records as pandas builds them from the rows, column by column: the oracle."""
    data: dict[str, Any] = {}
    for k, name in enumerate(RECORD_COLUMNS):
        values = [row[k] for row in rows]
        if name in ("user_id", "priority", "status", "reason", "instance_id",
                    "prefill_instance_id", "decode_instance_id", "policy", "model_name"):
            data[name] = pd.Series(values, dtype=object).astype("category")
        elif name in ("num_prompt_tokens", "num_output_tokens", "attempts"):
            data[name] = np.array(values, dtype=np.int64)
        elif name in ("request_id", "slo_met"):
            data[name] = values
        else:
            data[name] = np.array(values, dtype=np.float64)  # None is NaN
    for name in ("num_preemptions", "num_prefix_hit_tokens"):
        data[name] = np.array([e.get(name, math.nan) for e in extras], dtype=np.float64)
    return pd.DataFrame(data)


@pytest.mark.parametrize(("chunk_rows", "spill"), [(65_536, False), (1000, False), (999, True)])
def test_records_equal_what_pandas_builds_from_the_rows(
    chunk_rows: int, spill: bool, tmp_path: Path
) -> None:
    """Past the buffers' first capacity (1,024 rows), over chunk boundaries, with extras
    that come and go, float columns given None, and categories first seen late."""
    rows, extras = [], []
    for i in range(2500):
        row = list(_row(i, slo=None if i % 5 == 0 else 100 + i % 7,
                        reason="boom" if i % 11 == 0 else None))
        row[RECORD_COLUMNS.index("predicted_cost_usd")] = None if i % 2 else 0.5 * i
        row[RECORD_COLUMNS.index("instance_id")] = f"gpu-{i // 600}"  # a new one every 600
        rows.append(tuple(row))
        extra = {"num_preemptions": float(i % 3)} if 700 <= i < 1800 else {}
        if i % 4 == 0:
            extra["num_prefix_hit_tokens"] = 16.0 * i
        extras.append(extra)
    store = RecordStore(chunk_rows=chunk_rows, spill_dir=tmp_path if spill else None)
    for row, extra in zip(rows, extras, strict=True):
        store.append(row, extra)
    frame = store.frame()
    expected = _expected(rows, extras)[list(frame.columns)]
    pd.testing.assert_frame_equal(frame, expected)
    assert frame["predicted_cost_usd"].isna().sum() == 1250
    assert list(frame["instance_id"].cat.categories) == [f"gpu-{k}" for k in range(5)]


def test_a_bad_chunk_size_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        RecordStore(chunk_rows=0)


@pytest.mark.parametrize("spill", [False, True])
def test_max_records_keeps_the_most_recent_rows_and_drops_older_chunks(
    spill: bool, tmp_path: Path
) -> None:
    store = RecordStore(chunk_rows=1000, spill_dir=tmp_path if spill else None, max_records=4)
    assert store.chunk_rows == 4  # chunks no larger than what is kept
    _fill(store, 19)
    frame = store.frame()
    # whole chunks of 4 are dropped while what is left holds 4 rows: 16-18 open, 12-15 kept
    assert frame["request_id"].tolist() == [f"req-{i}" for i in range(12, 19)]
    assert store.num_dropped == 12 and len(store) == 19
    if spill:  # the dropped chunks' files are gone (frame() froze the open rows)
        kept = ["records-00003.arrow", "records-00004.arrow"]
        assert sorted(p.name for p in tmp_path.iterdir()) == kept
    with pytest.raises(ValueError, match="max_records"):
        RecordStore(max_records=0)


def test_a_summary_after_dropped_records_covers_the_window_of_those_kept() -> None:
    from cpsim.metrics import MetricsCollector

    collector = MetricsCollector(max_records=4)
    for i in range(19):
        collector.on_arrival(0.5 * i)
        collector.store.append(_row(i), {})
    summary = collector.summary(now=10.0, instances={})
    assert summary.completed_requests == 7  # rows 12-18
    # over 10.0 - 6.0 s (the first kept arrival), not since the run's first arrival
    assert summary.throughput_requests_per_s == pytest.approx(7 / 4.0)
