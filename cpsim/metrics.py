"""Per-request records, stored by column as requests finish, and the run summary built from them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from cpsim.types import ExecutionInstance, PerformanceMetrics, RequestStatus
from cpsim.validation import check_choice, check_positive
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
    "prefill_first_token_time_s": "float",
    "kv_transfer_start_s": "float",
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
    "model_name": "category",
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


_KINDS: Final = tuple(_COLUMN_KINDS.values())
_FLOAT_IDX: Final = tuple(k for k, kind in enumerate(_KINDS) if kind == "float")
_INT_IDX: Final = tuple(k for k, kind in enumerate(_KINDS) if kind == "int")
_CAT_IDX: Final = tuple(k for k, kind in enumerate(_KINDS) if kind == "category")
_REQUEST_ID: Final = RECORD_COLUMNS.index("request_id")
_SLO_MET: Final = RECORD_COLUMNS.index("slo_met")
_BOOLS: Final = np.array([None, False, True], dtype=object)  # slo_met by its code + 1
_FIRST_CAPACITY: Final = 1024  # rows; buffers double up to the chunk size


def _sorted_categories(values: list[Any]) -> list[Any]:
    """Categories in the order ``pd.Categorical(list)`` gives them: sorted, or in their order
    of first appearance where they do not sort."""
    try:
        return sorted(values)
    except TypeError:
        return values


def _categorical(codes: np.ndarray, values: list[Any]) -> pd.Categorical:
    """A chunk's categorical column from codes into ``values`` (-1: missing)."""
    categories = _sorted_categories(values)
    position = {value: k for k, value in enumerate(categories)}
    # code -> position among the sorted categories; the last entry keeps -1 missing
    rank = np.array([position[value] for value in values] + [-1], dtype=np.int64)
    index: Any = pd.Index(categories)
    column: pd.Categorical = pd.Categorical.from_codes(rank[codes], index)
    return column


class _Buffer:
    """A growable C array of float64 or int64 numbers, written through a memoryview: a
    number is stored as it arrives, and no Python object per value is kept (reading back
    a chunk's scattered float objects cost about 100 ns each, from memory)."""

    __slots__ = ("data", "floats", "view")

    def __init__(self, floats: bool, capacity: int, fill: float = 0.0) -> None:
        self.floats = floats
        self.data = bytearray(8 * capacity)
        self.view: Any = self._view()  # indexed with a boxed row number: see append
        if fill != 0.0:
            np.frombuffer(self.data, dtype=np.float64)[:] = fill

    def _view(self) -> Any:
        return memoryview(self.data).cast("d") if self.floats else memoryview(self.data).cast("q")

    def grow(self, capacity: int) -> None:
        self.view.release()  # a bytearray with an exported view cannot grow
        self.data.extend(bytes(8 * capacity - len(self.data)))
        self.view = self._view()

    def values(self, n: int) -> np.ndarray:
        dtype = np.float64 if self.floats else np.int64
        return np.frombuffer(self.data, dtype=dtype, count=n).copy()


class RecordStore:
    """Rows stored by column as they arrive, frozen into compact DataFrame chunks every
    ``chunk_rows`` rows, and written to Arrow files under ``spill_dir`` when one is given,
    so memory grows with the chunk, not with the run. Column types are fixed by
    ``_COLUMN_KINDS``, whatever the values.

    Numbers go straight into C arrays, one per column (floats; ints; the codes of
    categories, -1 for None; ``slo_met`` as -1, 0, 1), so a chunk is a copy of them; only
    request ids stay Python objects. Chunks are spilled as Arrow IPC (lz4): it writes about
    ten times faster than parquet, and reads a summary's columns back as fast. (From lists
    of Python objects, a chunk cost about 5 us a row to build and write, a tenth of a
    simulated request.)

    ``max_records``: keep the most recent rows, at least this many, and drop older chunks
    (their files too): a server that runs for weeks keeps memory and disk bounded. None:
    keep every row. ``num_dropped`` counts the rows let go."""

    def __init__(
        self,
        chunk_rows: int = 65_536,
        spill_dir: str | Path | None = None,
        max_records: int | None = None,
    ) -> None:
        check_positive("chunk_rows", chunk_rows, integer=True)
        if max_records is not None:
            check_positive("max_records", max_records, integer=True)
            chunk_rows = min(chunk_rows, max_records)
        self.chunk_rows = chunk_rows
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.max_records = max_records
        self.num_dropped = 0
        self._num_open = 0  # rows in the buffers, not frozen yet
        self._chunks: list[pd.DataFrame] = []
        self._spilled: list[Path] = []
        self._frozen_rows: list[int] = []  # rows of each chunk kept, oldest first
        self._num_frozen = 0  # chunks frozen so far, kept or not: names spilled files
        self._total = 0
        self._capacity = min(chunk_rows, _FIRST_CAPACITY)
        cap = self._capacity
        self._floats = [_Buffer(True, cap) for _ in _FLOAT_IDX]
        self._ints = [_Buffer(False, cap) for _ in _INT_IDX]
        self._cats = [_Buffer(False, cap) for _ in _CAT_IDX]
        self._met = _Buffer(False, cap)
        self._codes: list[dict[Any, int]] = [{} for _ in _CAT_IDX]  # value -> code
        self._ids: list[Any] = []
        self._extras: dict[str, _Buffer] = {}

    def _buffers(self) -> list[_Buffer]:
        return [*self._floats, *self._ints, *self._cats, self._met, *self._extras.values()]

    def append(self, values: tuple[Any, ...], extras: Mapping[str, float]) -> None:
        """One row: ``values`` in RECORD_COLUMNS order, plus named numeric extras."""
        if len(values) != len(RECORD_COLUMNS):
            raise ValueError(
                f"a record has {len(values)} values; RECORD_COLUMNS has {len(RECORD_COLUMNS)}"
            )
        n = self._num_open
        if n == self._capacity:
            self._capacity = min(2 * n, self.chunk_rows)
            for buf in self._buffers():
                buf.grow(self._capacity)
        row: Any = n  # boxed once for every column below (an int > 256 is an allocation)
        floats = self._floats
        for j in range(len(_FLOAT_IDX)):
            value = values[_FLOAT_IDX[j]]
            floats[j].view[row] = _NAN if value is None else value
        ints = self._ints
        for j in range(len(_INT_IDX)):
            ints[j].view[row] = values[_INT_IDX[j]]
        cats, codes = self._cats, self._codes
        for j in range(len(_CAT_IDX)):
            value = values[_CAT_IDX[j]]
            if value is None:
                code = -1
            else:
                seen = codes[j]
                found = seen.get(value)
                if found is None:
                    found = seen[value] = len(seen)
                code = found
            cats[j].view[row] = code
        met = values[_SLO_MET]
        self._met.view[row] = -1 if met is None else int(met)
        self._ids.append(values[_REQUEST_ID])
        cols = self._extras
        for name, value in extras.items():
            col = cols.get(name)
            if col is None:
                col = cols[name] = _Buffer(True, self._capacity, fill=_NAN)  # rows before
            col.view[row] = value
        if len(cols) > len(extras):  # an extra this row lacks is NaN
            for name, col in cols.items():
                if name not in extras:
                    col.view[row] = _NAN
        self._num_open = n + 1
        self._total += 1
        if n + 1 >= self.chunk_rows:
            self._freeze()

    def _freeze(self) -> None:
        n = self._num_open
        if not n:
            return
        columns: list[Any] = [None] * len(RECORD_COLUMNS)
        for j, k in enumerate(_FLOAT_IDX):
            columns[k] = self._floats[j].values(n)
        for j, k in enumerate(_INT_IDX):
            columns[k] = self._ints[j].values(n)
        for j, k in enumerate(_CAT_IDX):
            columns[k] = _categorical(self._cats[j].values(n), list(self._codes[j]))
        met = self._met.values(n)
        columns[_SLO_MET] = _BOOLS[met + 1] if (met < 0).any() else met.astype(bool)
        columns[_REQUEST_ID] = self._ids
        data: dict[str, Any] = dict(zip(RECORD_COLUMNS, columns, strict=True))
        for name, col in self._extras.items():
            data[name] = col.values(n)
        frame = pd.DataFrame(data)
        self._num_open = 0
        self._codes = [{} for _ in _CAT_IDX]
        self._ids = []
        self._frozen_rows.append(n)
        self._num_frozen += 1
        if self.spill_dir is None:
            self._chunks.append(frame)
        else:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"records-{self._num_frozen - 1:05d}.arrow"
            frame.to_feather(path)
            self._spilled.append(path)
        if self.max_records is not None:
            self._drop_beyond(self.max_records)

    def _drop_beyond(self, keep: int) -> None:
        """Drop the oldest chunks while the rest still hold ``keep`` rows."""
        while len(self._frozen_rows) > 1 and sum(self._frozen_rows[1:]) >= keep:
            self.num_dropped += self._frozen_rows.pop(0)
            if self._spilled:
                self._spilled.pop(0).unlink(missing_ok=True)
            else:
                self._chunks.pop(0)

    def __len__(self) -> int:
        return self._total

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All rows so far (only ``columns`` when given: reading a few columns back from
        spilled chunks keeps a summary of a long run cheap)."""
        self._freeze()
        chunks = self._chunks if columns is None else [c[columns] for c in self._chunks]
        parts = [pd.read_feather(p, columns=columns) for p in self._spilled] + chunks
        if not parts:
            names = RECORD_COLUMNS if columns is None else columns
            return pd.DataFrame({c: pd.Series(dtype=object) for c in names})
        if len(parts) == 1:
            return parts[0].copy()
        # the union of the chunks' categories, sorted: pd.concat keeps equal categoricals
        for name in _CATEGORICAL:
            if name in parts[0]:
                seen = dict.fromkeys(v for p in parts for v in p[name].cat.categories)
                cats = _sorted_categories(list(seen))
                parts = [p.assign(**{name: p[name].cat.set_categories(cats)}) for p in parts]
        return pd.concat(parts, ignore_index=True)


TTFT_AT: Final = ("client", "prefill")


class MetricsCollector:
    """Turns terminal requests into records and records into a PerformanceMetrics.

    A disaggregated request has two first tokens: the prefill instance's
    (``prefill_first_token_time_s``, what DistServe and Splitwise report) and the one its
    client receives from the decode instance after the KV transfer and a decode step
    (``first_token_time_s``, what a vLLM KV-connector deployment shows). ``ttft_at`` picks
    the one ``ttft_ms`` and ``tpot_ms`` (the tokens after it) are measured from; "client",
    the default, is what users of a deployment wait for."""

    def __init__(
        self,
        chunk_rows: int = 65_536,
        spill_dir: str | Path | None = None,
        max_records: int | None = None,
        ttft_at: str = "client",
    ) -> None:
        check_choice("ttft_at", ttft_at, TTFT_AT)
        self.ttft_at = ttft_at
        self.store = RecordStore(chunk_rows, spill_dir, max_records)
        self.first_arrival_s: float | None = None
        self.num_arrivals = 0
        self._instance_spans: dict[str, list[float]] = {}  # id -> [start, end or nan, $/h, GPUs]
        self._gpu_util: dict[str, float] = {}
        self._gpu_mem_gb: dict[str, float] = {}
        #: (instance_id, at_s, until_s, reason) of each outlier ejection, in order
        self.ejections: list[tuple[str, float, float, str]] = []

    def on_instance_added(self, instance: ExecutionInstance, now: float) -> None:
        gpus = float(instance.gpu_count or 1)
        self._instance_spans[instance.instance_id] = [now, _NAN, instance.cost_per_hour, gpus]

    def on_cold_start(self, instance: ExecutionInstance, start_s: float, end_s: float) -> None:
        """An instance was paid for from ``start_s`` to ``end_s`` before it served (its
        weights loading, its engine warming up), or while it started and was called off."""
        key = f"{instance.instance_id}@cold{start_s}"
        gpus = float(instance.gpu_count or 1)
        self._instance_spans[key] = [start_s, end_s, instance.cost_per_hour, gpus]

    def on_instance_removed(self, instance_id: str, now: float) -> None:
        span = self._instance_spans.get(instance_id)
        if span is not None:
            span[1] = now
            self._instance_spans[f"{instance_id}@{span[0]}"] = self._instance_spans.pop(instance_id)

    def on_ejection(self, instance_id: str, now: float, until_s: float, reason: str) -> None:
        self.ejections.append((instance_id, now, until_s, reason))

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
        first = req.first_token_s
        if self.ttft_at == "prefill" and req.prefill_done_s is not None:
            first = req.prefill_done_s
        tpot = _NAN
        if completed and n_out > 1 and first is not None and req.finish_s is not None:
            tpot = 1000.0 * (req.finish_s - first) / (n_out - 1)
        row = (
            v.request_id,
            v.user_id,
            v.priority._name_,  # Enum.name is a Python property; _name_ is its plain field
            req.status._name_,
            req.reason or None,
            v.arrival_s,
            _NAN if req.dispatch_s is None else req.dispatch_s,
            _NAN if req.first_token_s is None else req.first_token_s,
            _NAN if req.prefill_done_s is None else req.prefill_done_s,
            _NAN if req.handoff_s is None else req.handoff_s,
            req.finish_s,
            _ms(v.arrival_s, req.dispatch_s),
            _ms(v.arrival_s, first),
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
            self._model_of(req, instances),
        )
        self.store.append(row, req.extras)
        return slo_met

    @staticmethod
    def _model_of(req: RequestState, instances: Mapping[str, InstanceState]) -> str | None:
        """The model the request asked for, else the model of the instance it ran on."""
        model = req.view.model_name
        if model is None and req.instance_id is not None:
            inst = instances.get(req.instance_id)
            if inst is not None:
                model = inst.instance.model_name
        return model

    def records(self) -> pd.DataFrame:
        return self.store.frame()

    def total_cost_usd(self, now: float) -> float:
        total = 0.0
        for start, end, rate, _gpus in self._instance_spans.values():
            stop = now if math.isnan(end) else end
            total += max(0.0, stop - start) * rate / 3600.0
        return total

    def gpu_hours(self, now: float) -> float:
        """GPU-hours paid for up to ``now``: every instance's GPUs from when it was added (or
        began its cold start) to when it was removed."""
        total = 0.0
        for start, end, _rate, gpus in self._instance_spans.values():
            stop = now if math.isnan(end) else end
            total += max(0.0, stop - start) * gpus / 3600.0
        return total

    def summary(
        self,
        now: float,
        instances: Mapping[str, InstanceState],
        num_active: int = 0,
        num_queued: int = 0,
        records: pd.DataFrame | None = None,
    ) -> PerformanceMetrics:
        start = self.first_arrival_s
        columns = [*SUMMARY_COLUMNS, "model_name", "cost_usd"]
        if records is not None:
            df = records
        elif self.store.num_dropped:  # the window of the rows kept, read with them
            df = self.store.frame([*columns, "arrival_time_s"])
            start = float(df["arrival_time_s"].min()) if len(df) else now
        else:
            df = self.store.frame(columns)
        window_s = (now - start) if start is not None else 0.0
        models: dict[str, PerformanceMetrics] = {}
        if "model_name" in df and df["model_name"].nunique() > 1:
            # per model: its requests over the same window, costed by what they were charged
            for model, rows in df.groupby("model_name", observed=True):
                cost = float(rows["cost_usd"].sum()) if "cost_usd" in rows else 0.0
                models[str(model)] = summarize(rows, window_s=window_s, total_cost_usd=cost)
        return summarize(
            df,
            window_s=window_s,
            num_active=num_active,
            num_queued=num_queued,
            gpu_utilization=self._utilization(now, instances),
            used_gpu_memory_gb=sum(self._gpu_mem_gb.get(i, 0.0) for i in instances),
            total_cost_usd=self.total_cost_usd(now),
            models=models,
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
    models: dict[str, PerformanceMetrics] | None = None,
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
        models=models or {},
    )
