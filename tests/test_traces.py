"""Trace loaders and replay: row counts and statistics of the public traces, scaling, sampling,
prefix blocks, and errors that name the file and line of a malformed row."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from cpsim.workload import (
    PoissonArrivals,
    SyntheticWorkload,
    TraceArrivals,
    TraceSampledLengths,
    TraceWorkload,
    default_trace_dir,
    load_trace,
)
from cpsim.workload.traces import TRACE_DIR_ENV, resolve_trace_path

AZURE_CONV = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = "azure_llm_2023/AzureLLMInferenceTrace_code.csv"
MOONCAKE_CONV = "mooncake_fast25/conversation_trace.jsonl"
MOONCAKE_SYNTH = "mooncake_fast25/synthetic_trace.jsonl"
SHAREGPT = "sharegpt_derived/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"


def _need(relative: str) -> str:
    path = resolve_trace_path(relative)
    if not path.is_file():
        pytest.skip(f"public trace {path} is absent (folder ../shared/traces or ${TRACE_DIR_ENV})")
    return relative


# rows, format, mean req/s, inter-arrival CV, prompt mean / p50, output mean / p50 (README).
README_TABLE = [
    (AZURE_CONV, 19_366, "azure", 5.5, 1.09, 1155, 1020, 211, 129),
    (AZURE_CODE, 8_819, "azure", 2.6, 13.2, 2048, 1469, 28, 13),
    (MOONCAKE_CONV, 12_031, "mooncake", 3.4, 3.0, 12035, 6909, 343, 350),
    (MOONCAKE_SYNTH, 3_993, "mooncake", 3.9, 1.0, 15326, 11587, 149, 69),
    (SHAREGPT, 30_731, "sharegpt", None, None, 2340, 1730, 439, 415),
]


@pytest.mark.parametrize(
    ("path", "rows", "fmt", "rate", "cv", "p_mean", "p_med", "o_mean", "o_med"),
    README_TABLE,
    ids=[row[2] + "-" + Path(row[0]).stem[-4:] for row in README_TABLE],
)
def test_trace_matches_readme(
    path: str,
    rows: int,
    fmt: str,
    rate: float | None,
    cv: float | None,
    p_mean: float,
    p_med: float,
    o_mean: float,
    o_med: float,
) -> None:
    table = load_trace(_need(path))
    assert (len(table), table.format) == (rows, fmt)
    assert table.prompt_tokens.mean() == pytest.approx(p_mean, rel=0.005)
    assert np.median(table.prompt_tokens) == p_med
    assert table.output_tokens.mean() == pytest.approx(o_mean, rel=0.01)
    assert np.median(table.output_tokens) == o_med
    if rate is None:
        assert table.arrival_s is None and table.mean_rate_rps is None
        return
    assert table.arrival_s is not None and table.arrival_s[0] == 0.0
    assert (np.diff(table.arrival_s) >= 0).all()
    assert table.mean_rate_rps == pytest.approx(rate, abs=0.05)
    gaps = np.diff(table.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.02)


def test_mooncake_hash_ids_become_prefix_blocks() -> None:
    path = _need(MOONCAKE_CONV)
    table = load_trace(path)
    assert table.hash_ids is not None
    reqs = [r for _, r in TraceWorkload(path, max_requests=200).requests(0)]
    for row, req in enumerate(reqs):
        assert req.prefix_block_ids == table.hash_ids[row]
        assert req.prefix_block_size_tokens == 512
        assert req.num_prompt_tokens == table.prompt_tokens[row]
        assert req.max_tokens == table.output_tokens[row]
    # Blocks repeat across requests (shared prefixes): the point of this trace.
    blocks = [b for r in reqs for b in r.prefix_block_ids or ()]
    assert len(set(blocks)) < len(blocks)


def test_clip_to_context_cuts_prompt_and_blocks() -> None:
    workload = TraceWorkload(_need(MOONCAKE_CONV), max_context_tokens=2048, max_requests=500)
    for _, req in workload.requests(0):
        assert req.prompt_tokens + req.max_tokens <= 2048
        blocks = req.prefix_block_ids or ()
        assert len(blocks) == -(-req.prompt_tokens // 512)
    assert workload.mean_prompt_tokens + workload.mean_output_tokens <= 2048


def test_replay_keeps_azure_times_and_lengths() -> None:
    path = _need(AZURE_CONV)
    table = load_trace(path)
    stream = list(itertools.islice(TraceWorkload(path).requests(0), 100))
    assert table.arrival_s is not None
    assert [t for t, _ in stream] == table.arrival_s[:100].tolist()
    assert [r.max_tokens for _, r in stream] == table.output_tokens[:100].tolist()
    assert [r.request_id for _, r in stream[:2]] == ["req-0", "req-1"]


def test_time_scale_halves_inter_arrivals() -> None:
    path = _need(AZURE_CONV)
    base = np.array([t for t, _ in TraceWorkload(path, max_requests=2000).requests(0)])
    fast = np.array(
        [t for t, _ in TraceWorkload(path, max_requests=2000, time_scale=0.5).requests(0)]
    )
    assert np.diff(fast) == pytest.approx(np.diff(base) / 2)
    full = TraceWorkload(path, time_scale=0.5)
    assert full.mean_rate_rps == pytest.approx(2 * 5.53, rel=0.01)


def test_rate_override_rescales_to_target_rate() -> None:
    workload = TraceWorkload(_need(MOONCAKE_CONV), rate_rps=10.0, max_requests=3000)
    times = np.array([t for t, _ in workload.requests(0)])
    assert (times.size - 1) / (times[-1] - times[0]) == pytest.approx(10.0)
    assert workload.mean_rate_rps == pytest.approx(10.0)


def test_sub_sampling_is_deterministic_per_seed() -> None:
    workload = TraceWorkload(_need(AZURE_CODE), sample_frac=0.25)

    def ids(seed: int) -> list[tuple[float, int]]:
        return [(t, r.prompt_tokens) for t, r in workload.requests(seed)]

    first = ids(1)
    assert first == ids(1) and first != ids(2)
    assert len(first) == pytest.approx(8819 * 0.25, rel=0.05)


def test_window_and_max_requests() -> None:
    path = _need(AZURE_CONV)
    table = load_trace(path)
    assert table.arrival_s is not None
    workload = TraceWorkload(path, start_s=600.0, duration_s=300.0)
    times = [t for t, _ in workload.requests(0)]
    inside = (table.arrival_s >= 600) & (table.arrival_s < 900)
    assert len(times) == int(inside.sum()) and min(times) >= 0 and max(times) < 300
    assert len(list(TraceWorkload(path, max_requests=17).requests(0))) == 17


def test_sharegpt_needs_an_arrival_process() -> None:
    path = _need(SHAREGPT)
    with pytest.raises(ValueError, match="no timestamps"):
        list(TraceWorkload(path).requests(0))
    workload = TraceWorkload(path, arrival=PoissonArrivals(4.0), max_requests=1000)
    stream = list(workload.requests(0))
    table = load_trace(path)
    assert len(stream) == 1000 and workload.mean_rate_rps == 4.0
    assert [r.num_prompt_tokens for _, r in stream] == table.prompt_tokens[:1000].tolist()


def test_trace_sampled_lengths_and_trace_arrivals_combine() -> None:
    lengths = TraceSampledLengths(_need(SHAREGPT))
    arrival = TraceArrivals(_need(AZURE_CONV), time_scale=0.5)
    workload = SyntheticWorkload(arrival, lengths=lengths, num_requests=5000)
    stream = list(workload.requests(0))
    assert len(stream) == 5000
    assert workload.mean_rate_rps == pytest.approx(11.06, rel=0.01)
    assert workload.mean_prompt_tokens == pytest.approx(2340, rel=0.01)
    pairs = {(r.prompt_tokens, r.max_tokens) for _, r in stream}
    table = lengths.table
    known = set(zip(table.prompt_tokens.tolist(), table.output_tokens.tolist(), strict=True))
    assert pairs <= known


def test_relative_paths_use_the_trace_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path))
    (tmp_path / "t.csv").write_text("num_prefill_tokens,num_decode_tokens\n5,6\n")
    assert default_trace_dir() == tmp_path
    table = load_trace("t.csv")
    assert table.prompt_tokens.tolist() == [5] and table.output_tokens.tolist() == [6]
    monkeypatch.delenv(TRACE_DIR_ENV)
    expected = Path(__file__).resolve().parents[2] / "shared" / "traces"
    assert default_trace_dir() == expected.resolve()
    with pytest.raises(ValueError, match="not found"):
        load_trace(tmp_path / "missing.csv")


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_OK = "2023-11-16 18:15:46.6805900,374,44\n"
MOONCAKE_OK = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}\n'
SHAREGPT_HEADER = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"


@pytest.mark.parametrize(
    ("name", "text", "line", "fragment"),
    [
        ("a.csv", AZURE_HEADER + AZURE_OK + "yesterday,1,2\n", 3, "TIMESTAMP='yesterday'"),
        ("a.csv", AZURE_HEADER + AZURE_OK + AZURE_OK[:-3] + "x\n", 3, "GeneratedTokens='x'"),
        ("a.csv", AZURE_HEADER + AZURE_OK + AZURE_OK[:-1] + ",9\n", 3, "3 comma-separated"),
        ("a.csv", AZURE_HEADER + "2023-11-16 18:15:47,12\n", 2, "3 comma-separated"),
        ("a.csv", AZURE_HEADER + "2023-11-16 18:15:47,-3,2\n", 2, "ContextTokens='-3'"),
        ("a.csv", "TIMESTAMP,Context,GeneratedTokens\n" + AZURE_OK, 1, "ContextTokens"),
        ("m.jsonl", MOONCAKE_OK + MOONCAKE_OK + "{not json\n", 3, "not valid JSON"),
        ("m.jsonl", MOONCAKE_OK + '{"timestamp": 5, "input_length": 3}\n', 2, "output_length"),
        ("m.jsonl", MOONCAKE_OK + MOONCAKE_OK.replace("0,", '"a",', 1), 2, "timestamp='a'"),
        ("m.jsonl", MOONCAKE_OK.replace("[0, 1]", '"x"'), 1, "hash_ids='x'"),
        ("m.jsonl", MOONCAKE_OK + "[1, 2]\n", 2, "JSON object"),
        ("s.csv", SHAREGPT_HEADER + "74,918,992,0.08\n3.5,2,5.5,1\n", 3, "num_prefill_tokens"),
    ],
)
def test_malformed_row_names_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, fragment: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_trace(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message and fragment in message


def test_unknown_format_and_empty_trace(tmp_path: Path) -> None:
    odd = tmp_path / "odd.csv"
    odd.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="cannot tell the trace format"):
        load_trace(odd)
    with pytest.raises(ValueError, match="unknown trace format 'parquet'"):
        load_trace(odd, "parquet")
    empty = tmp_path / "empty.csv"
    empty.write_text(SHAREGPT_HEADER)
    with pytest.raises(ValueError, match="no request rows"):
        load_trace(empty)


def test_unsorted_timestamps_are_replayed_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    rows = [(2000, 10), (0, 20), (1000, 30)]
    path.write_text(
        "".join(
            f'{{"timestamp": {t}, "input_length": {n}, "output_length": 1, "hash_ids": []}}\n'
            for t, n in rows
        )
    )
    stream = list(TraceWorkload(str(path)).requests(0))
    assert [(t, r.prompt_tokens) for t, r in stream] == [(0.0, 20), (1.0, 30), (2.0, 10)]
    assert stream[0][1].prefix_block_ids is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"time_scale": 0.0}, "time_scale=0.0"),
        ({"rate_rps": 2.0, "time_scale": 0.5}, "rate_rps=2.0"),
        ({"sample_frac": 1.5}, "sample_frac=1.5"),
        ({"sample_frac": 0.0}, "sample_frac=0.0"),
        ({"max_requests": 0}, "max_requests=0"),
        ({"start_s": -1.0}, "start_s=-1.0"),
        ({"arrival": PoissonArrivals(1.0), "rate_rps": 3.0}, "not with arrival"),
    ],
)
def test_bad_trace_workload_parameters(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        TraceWorkload("x.csv", **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
