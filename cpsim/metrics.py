"""Per-request records, stored by column as requests finish, and the run summary built from them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cpsim.types import ExecutionInstance, PerformanceMetrics, RequestStatus
from cpsim.views import InstanceSnapshot

if TYPE_CHECKING:
    from cpsim.instances import InstanceState
    from cpsim.requests import RequestState

#: Columns every record has, in order, each with how a chunk stores it: "float" and "int" as
#: numpy arrays of those types (None is NaN), "category" as pandas categories, "object" as
#: pandas infers (ids, ``slo_met``). Backends may add numeric extras after them.
_COLUMN_KINDS = {
    "request_id": "object",
    "user_id": "category",
    "priority": "category",
    "status": "category",
    "reason": "category",
    "arrival_time_s": "float",
    "dispatch_time_s": "float",
    "first_token_time_s": "float",
    "finish_time_s": "float",
    "queue_delay_ms": "float",
    "ttft_ms": "float",
    "tpot_ms": "float",
    "latency_ms": "float",
    "num_prompt_tokens": "int",
    "num_output_tokens": "int",
    "instance_id": "category",
    "prefill_instance_id": "category",
    "decode_instance_id": "category",
    "slo_deadline_ms": "float",
    "slo_met": "object",
    "cost_usd": "float",
    "predicted_cost_usd": "float",
    "policy": "category",
    "attempts": "int",
}
RECORD_COLUMNS = tuple(_COLUMN_KINDS)
#: What ``summarize`` reads: a run's summary never needs the rest.
SUMMARY_COLUMNS = ("status", "latency_ms", "ttft_ms", "tpot_ms", "num_prompt_tokens",
                   "num_output_tokens", "slo_met")
_CATEGORICAL = tuple(name for name, kind in _COLUMN_KINDS.items() if kind == "category")
_NAN = float("nan")


def _ms(start: float | None, end: float | None) -> float:
    if start is None or end is None:
        return _NAN
    return 1000.0 * (end - start)


def _column(kind: str, values: list[Any]) -> Any:
    """One chunk's column of ``kind`` (see ``_COLUMN_KINDS``)."""
    if kind == "float":
        return np.array(values, dtype=np.float64)
    if kind == "int":
        return np.array(values, dtype=np.int64)
    if kind == "category":
        return pd.Categorical(values)
    return values


class RecordStore:
    """Rows collected by column into Python lists, frozen into compact DataFrame chunks
    every ``chunk_rows`` rows, and written to parquet files under ``spill_dir`` when one is
    given, so memory grows with the chunk, not with the run. (By column, with the dtypes
    given: pandas building a chunk from row tuples, inferring each column's type, cost
    about three times as much, and typed a column by its values: integer SLO deadlines
    came out int64, or float64 once one request had none.)"""

    def __init__(self, chunk_rows: int = 65_536, spill_dir: str | Path | None = None) -> None:
        self.chunk_rows = chunk_rows
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._columns: list[list[Any]] = [[] for _ in RECORD_COLUMNS]
        self._num_open = 0  # rows in the columns, not frozen yet
        self._extras: dict[str, list[float]] = {}
        self._chunks: list[pd.DataFrame] = []
        self._spilled: list[Path] = []
        self._total = 0

    def append(self, values: tuple[Any, ...], extras: Mapping[str, float]) -> None:
        """One row: ``values`` in RECORD_COLUMNS order, plus named numeric extras."""
        if len(values) != len(RECORD_COLUMNS):
            raise ValueError(
                f"a record has {len(values)} values; RECORD_COLUMNS has {len(RECORD_COLUMNS)}"
            )
        cols = self._extras
        n = self._num_open
        for name, col in cols.items():
            col.append(extras.get(name, _NAN))
        for name in extras:
            if name not in cols:
                cols[name] = [_NAN] * n + [extras[name]]
        columns = self._columns
        for k in range(len(columns)):  # by index: compiled, much cheaper than zip's tuples
            columns[k].append(values[k])
        self._num_open = n + 1
        self._total += 1
        if n + 1 >= self.chunk_rows:
            self._freeze()

    def _freeze(self) -> None:
        if not self._num_open:
            return
        data: dict[str, Any] = {
            name: _column(kind, values)
            for (name, kind), values in zip(_COLUMN_KINDS.items(), self._columns, strict=True)
        }
        for name, col in self._extras.items():
            data[name] = np.array(col, dtype=np.float64)
        frame = pd.DataFrame(data)
        self._columns = [[] for _ in RECORD_COLUMNS]
        self._num_open = 0
        self._extras = {name: [] for name in self._extras}
        if self.spill_dir is None:
            self._chunks.append(frame)
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"records-{len(self._spilled):05d}.parquet"
        frame.to_parquet(path, index=False)
        self._spilled.append(path)

    def __len__(self) -> int:
        return self._total

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All rows so far (only ``columns`` when given: reading a few columns back from
        spilled chunks keeps a summary of a long run cheap)."""
        self._freeze()
        chunks = self._chunks if columns is None else [c[columns] for c in self._chunks]
        parts = [pd.read_parquet(p, columns=columns) for p in self._spilled] + chunks
        if not parts:
            names = RECORD_COLUMNS if columns is None else columns
            return pd.DataFrame({c: pd.Series(dtype=object) for c in names})
        frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].copy()
        for name in _CATEGORICAL:
            if name in frame:
                frame[name] = frame[name].astype(object).astype("category")
        return frame


class MetricsCollector:
    """Turns terminal requests into records and records into a PerformanceMetrics."""

    def __init__(self, chunk_rows: int = 65_536, spill_dir: str | Path | None = None) -> None:
        self.store = RecordStore(chunk_rows, spill_dir)
        self.first_arrival_s: float | None = None
        self.num_arrivals = 0
        self._instance_spans: dict[str, list[float]] = {}  # id -> [start, end or nan, $/h]
        self._gpu_util: dict[str, float] = {}
        self._gpu_mem_gb: dict[str, float] = {}

    def on_instance_added(self, instance: ExecutionInstance, now: float) -> None:
        self._instance_spans[instance.instance_id] = [now, _NAN, instance.cost_per_hour]

    def on_instance_removed(self, instance_id: str, now: float) -> None:
        span = self._instance_spans.get(instance_id)
        if span is not None:
            span[1] = now
            self._instance_spans[f"{instance_id}@{span[0]}"] = self._instance_spans.pop(instance_id)

    def on_snapshot(self, snap: InstanceSnapshot, gpu_memory_gb: float, now: float) -> None:
        """A scrape of an instance with ``gpu_memory_gb`` of GPU memory over all its GPUs."""
        if snap.gpu_utilization_frac is not None:
            self._gpu_util[snap.instance_id] = snap.gpu_utilization_frac
        if snap.kv_cache_usage_frac is not None:
            self._gpu_mem_gb[snap.instance_id] = snap.kv_cache_usage_frac * gpu_memory_gb

    def on_arrival(self, now: float) -> None:
        self.num_arrivals += 1
        if self.first_arrival_s is None:
            self.first_arrival_s = now

    def on_terminal(self, req: RequestState, instances: Mapping[str, InstanceState]) -> bool | None:
        """Record a request that reached its terminal state; returns whether it met its SLO
        (None when it has none)."""
        v = req.view
        latency_ms = _ms(v.arrival_s, req.finish_s)
        completed = req.status is RequestStatus.COMPLETED
        slo_met: bool | None = None
        if v.slo_deadline_ms is not None and req.status is not RequestStatus.CANCELLED:
            slo_met = completed and latency_ms <= v.slo_deadline_ms
        n_out = req.num_output_tokens
        tpot = _NAN
        if completed and n_out > 1 and req.first_token_s is not None and req.finish_s is not None:
            tpot = 1000.0 * (req.finish_s - req.first_token_s) / (n_out - 1)
        row = (
            v.request_id,
            v.user_id,
            v.priority._name_,  # Enum.name is a Python property; _name_ is its plain field
            req.status._name_,
            req.reason or None,
            v.arrival_s,
            _NAN if req.dispatch_s is None else req.dispatch_s,
            _NAN if req.first_token_s is None else req.first_token_s,
            req.finish_s,
            _ms(v.arrival_s, req.dispatch_s),
            _ms(v.arrival_s, req.first_token_s),
            tpot,
            latency_ms if completed else _NAN,
            v.num_prompt_tokens,
            n_out,
            req.instance_id,
            req.prefill_instance_id,
            req.decode_instance_id,
            _NAN if v.slo_deadline_ms is None else v.slo_deadline_ms,
            slo_met,
            req.cost_usd,
            _NAN if req.predicted_cost_usd is None else req.predicted_cost_usd,
            req.policy_used,
            req.attempts,
        )
        self.store.append(row, req.extras)
        return slo_met

    def records(self) -> pd.DataFrame:
        return self.store.frame()

    def total_cost_usd(self, now: float) -> float:
        total = 0.0
        for start, end, rate in self._instance_spans.values():
            stop = now if math.isnan(end) else end
            total += max(0.0, stop - start) * rate / 3600.0
        return total

    def summary(
        self,
        now: float,
        instances: Mapping[str, InstanceState],
        num_active: int = 0,
        num_queued: int = 0,
        records: pd.DataFrame | None = None,
    ) -> PerformanceMetrics:
        df = self.store.frame(list(SUMMARY_COLUMNS)) if records is None else records
        return summarize(
            df,
            window_s=(now - self.first_arrival_s) if self.first_arrival_s is not None else 0.0,
            num_active=num_active,
            num_queued=num_queued,
            gpu_utilization=self._utilization(now, instances),
            used_gpu_memory_gb=sum(self._gpu_mem_gb.get(i, 0.0) for i in instances),
            total_cost_usd=self.total_cost_usd(now),
        )

    def _utilization(self, now: float, instances: Mapping[str, InstanceState]) -> float:
        if not instances:
            return 0.0
        fracs = [self._gpu_util.get(iid, inst.busy_frac(now)) for iid, inst in instances.items()]
        return float(np.mean(fracs))


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else 0.0


def summarize(
    df: pd.DataFrame,
    window_s: float,
    num_active: int = 0,
    num_queued: int = 0,
    gpu_utilization: float = 0.0,
    used_gpu_memory_gb: float = 0.0,
    total_cost_usd: float = 0.0,
) -> PerformanceMetrics:
    """A PerformanceMetrics from per-request records (one row per terminal request)."""
    status = df["status"].astype(str)
    done = df[status == "COMPLETED"]
    lat = done["latency_ms"].to_numpy(dtype=float)
    ttft = done["ttft_ms"].to_numpy(dtype=float)
    tpot = done["tpot_ms"].dropna().to_numpy(dtype=float)
    tokens = float(done["num_prompt_tokens"].sum() + done["num_output_tokens"].sum())
    with_slo = df[df["slo_met"].notna()]
    met = int(with_slo["slo_met"].astype(bool).sum())
    violations = len(with_slo) - met
    good = len(done) - int(
        (done["slo_met"].notna() & ~done["slo_met"].fillna(True).astype(bool)).sum()
    )
    window = window_s if window_s > 0 else 0.0
    return PerformanceMetrics(
        total_requests=len(df) + num_active,
        completed_requests=len(done),
        failed_requests=int((status == "FAILED").sum()),
        cancelled_requests=int((status == "CANCELLED").sum()),
        rejected_requests=int((status == "REJECTED").sum()),
        active_requests=num_active - num_queued,
        queued_requests=num_queued,
        avg_latency_ms=float(lat.mean()) if lat.size else 0.0,
        p50_latency_ms=_pct(lat, 50),
        p95_latency_ms=_pct(lat, 95),
        p99_latency_ms=_pct(lat, 99),
        avg_ttft_ms=float(ttft.mean()) if ttft.size else 0.0,
        p50_ttft_ms=_pct(ttft, 50),
        p95_ttft_ms=_pct(ttft, 95),
        p99_ttft_ms=_pct(ttft, 99),
        avg_tpot_ms=float(tpot.mean()) if tpot.size else 0.0,
        p50_tpot_ms=_pct(tpot, 50),
        p95_tpot_ms=_pct(tpot, 95),
        p99_tpot_ms=_pct(tpot, 99),
        throughput_tokens_per_s=tokens / window if window else 0.0,
        throughput_requests_per_s=len(done) / window if window else 0.0,
        slo_violations=violations,
        slo_compliance_rate=met / len(with_slo) if len(with_slo) else 1.0,
        goodput_requests_per_s=good / window if window else 0.0,
        avg_gpu_utilization=gpu_utilization,
        used_gpu_memory_gb=used_gpu_memory_gb,
        total_cost_usd=total_cost_usd,
        cost_per_token=total_cost_usd / tokens if tokens else 0.0,
        window_s=window,
    )
