"""Synthetic workloads: arrival statistics, length laws, the request mix, determinism, laziness."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cpsim.types import RequestMetadata, RequestPriority
from cpsim.workload import (
    DiurnalArrivals,
    FixedLengths,
    GammaArrivals,
    LogNormalLengths,
    OnOffArrivals,
    PoissonArrivals,
    RampArrivals,
    RequestMix,
    SyntheticWorkload,
    TraceWorkload,
    UniformLengths,
    Workload,
    clip_to_context,
    default_trace_dir,
)
from cpsim.workload.arrivals import ArrivalProcess
from cpsim.workload.emit import emit_batch
from cpsim.workload.traces import resolve_trace_path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "workload"


def _times(arrival: ArrivalProcess, n: int, until_s: float = math.inf) -> np.ndarray[Any, Any]:
    """The first ``n`` arrivals, or those before ``until_s``, whichever is fewer."""
    out: list[np.ndarray[Any, Any]] = []
    total = 0
    for batch in arrival.batches(np.random.default_rng(0), 4096):
        out.append(batch)
        total += batch.size
        if total >= n or batch[-1] >= until_s:
            break
    times = np.concatenate(out)[:n]
    return times[times < until_s]


def _cv(times: np.ndarray[Any, Any]) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


def _small(arrival: ArrivalProcess, **kwargs: Any) -> SyntheticWorkload:
    return SyntheticWorkload(
        arrival,
        prompt_lengths=LogNormalLengths(median_tokens=200, sigma=1.0, max_tokens=4000),
        output_lengths=UniformLengths(1, 300),
        mix=RequestMix(priorities={"high": 0.3, "normal": 0.7}, num_users=10),
        **kwargs,
    )


WORKLOADS = {
    "poisson": _small(PoissonArrivals(10.0), num_requests=5000),
    "gamma": _small(GammaArrivals(10.0, cv=3.0), num_requests=5000),
    "on_off": _small(OnOffArrivals(50.0, mean_on_s=2.0, mean_off_s=3.0), num_requests=5000),
    "ramp": _small(RampArrivals(1.0, 20.0, ramp_s=100.0), duration_s=200.0),
}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_stream_other_seed_other_stream(name: str) -> None:
    workload = WORKLOADS[name]
    first = list(workload.requests(7))
    assert first == list(workload.requests(7))
    assert first != list(workload.requests(8))
    assert list(workload.requests(np.random.default_rng(3))) == list(
        workload.requests(np.random.default_rng(3))
    )


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_stream_is_time_ordered_with_unique_ids(name: str) -> None:
    stream = list(WORKLOADS[name].requests(1))
    times = [t for t, _ in stream]
    assert times == sorted(times) and times[0] >= 0
    ids = [r.request_id for _, r in stream]
    assert len(set(ids)) == len(ids) and ids[0] == "req-0"
    assert isinstance(WORKLOADS[name], Workload)


def test_poisson_mean_rate_and_unit_cv() -> None:
    times = _times(PoissonArrivals(25.0), 200_000)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 25.0, rel=0.01)
    assert _cv(times) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_inter_arrival_cv_and_rate(cv: float) -> None:
    times = _times(GammaArrivals(8.0, cv=cv), 200_000)
    assert _cv(times) == pytest.approx(cv, rel=0.05)
    assert np.diff(times).mean() == pytest.approx(1 / 8.0, rel=0.03)


def test_on_off_mean_rate_matches_duty_cycle_and_is_bursty() -> None:
    arrival = OnOffArrivals(40.0, mean_on_s=1.0, mean_off_s=4.0, rate_off_rps=5.0)
    assert arrival.mean_rate_rps == pytest.approx((40 * 1 + 5 * 4) / 5)
    times = _times(arrival, 100_000)
    assert times.size / times[-1] == pytest.approx(arrival.mean_rate_rps, rel=0.05)
    assert _cv(times) > 1.3


@pytest.mark.parametrize(("start", "end"), [(2.0, 20.0), (0.0, 10.0), (20.0, 2.0)])
def test_ramp_rate_follows_the_ramp(start: float, end: float) -> None:
    ramp_s = 2000.0
    arrival = RampArrivals(start, end, ramp_s=ramp_s)
    times = _times(arrival, 10**9, until_s=ramp_s)
    counts, _ = np.histogram(times, bins=4, range=(0.0, ramp_s))
    expected = [
        (arrival.rate_at(a) + arrival.rate_at(a + ramp_s / 4)) / 2 * ramp_s / 4
        for a in np.arange(4) * ramp_s / 4
    ]
    assert counts == pytest.approx(expected, rel=0.08)
    assert (np.diff(counts) > 0).all() == (end > start)


def test_diurnal_rate_follows_its_day() -> None:
    arrivals = DiurnalArrivals(trough_rps=1.0, peak_rps=9.0, period_s=600.0)
    batches = arrivals.batches(np.random.default_rng(0), 4096)
    times = np.concatenate(list(itertools.islice(batches, 20)))  # 20 x 4096 at 9/s: 9100 s
    times = times[times < 6000.0]  # ten days
    assert times.size / 6000.0 == pytest.approx(arrivals.mean_rate_rps, rel=0.02)
    phase = times % 600.0
    peak = np.sum(np.abs(phase - 300.0) < 30.0) / (10 * 60.0)  # the minute around each peak
    trough = np.sum((phase < 30.0) | (phase > 570.0)) / (10 * 60.0)
    assert 8.5 < peak < 9.1 and 0.9 < trough < 1.6
    with pytest.raises(ValueError, match=r"peak_rps=1\.0 is below trough_rps=2\.0"):
        DiurnalArrivals(trough_rps=2.0, peak_rps=1.0, period_s=60.0)


def test_ramp_down_to_zero_ends_the_stream() -> None:
    times = _times(RampArrivals(10.0, 0.0, ramp_s=100.0), 10**9)
    assert times.max() < 100.0
    assert times.size == pytest.approx(500, abs=5 * math.sqrt(500))


def test_lognormal_median_mean_and_clip() -> None:
    rng = np.random.default_rng(0)
    by_median = LogNormalLengths(median_tokens=400, sigma=0.8)
    tokens = by_median.sample(rng, 200_000)
    assert np.median(tokens) == pytest.approx(400, rel=0.02)
    assert tokens.mean() == pytest.approx(400 * math.exp(0.32), rel=0.02)
    assert tokens.mean() == pytest.approx(by_median.expected_tokens, rel=0.02)
    by_mean = LogNormalLengths(mean_tokens=300, sigma=1.0)
    assert by_mean.sample(rng, 200_000).mean() == pytest.approx(300, rel=0.03)
    by_p99 = LogNormalLengths(median_tokens=1020, p99_tokens=4142)
    assert np.percentile(by_p99.sample(rng, 200_000), 99) == pytest.approx(4142, rel=0.04)
    clipped = LogNormalLengths(median_tokens=400, sigma=2.0, min_tokens=50, max_tokens=1000)
    tokens = clipped.sample(rng, 100_000)
    assert tokens.min() == 50 and tokens.max() == 1000
    assert tokens.mean() == pytest.approx(clipped.expected_tokens, rel=0.02)


@pytest.mark.parametrize(
    ("dist", "low", "high", "mean"),
    [
        (FixedLengths(128), 128, 128, 128.0),
        (UniformLengths(10, 20), 10, 20, 15.0),
        (LogNormalLengths(mean_tokens=50, p99_tokens=300, max_tokens=200), 1, 200, None),
    ],
)
def test_lengths_stay_in_bounds(dist: Any, low: int, high: int, mean: float | None) -> None:
    tokens = dist.sample(np.random.default_rng(1), 50_000)
    assert tokens.dtype == np.int64 and tokens.min() >= low and tokens.max() <= high
    assert tokens.mean() == pytest.approx(mean or dist.expected_tokens, rel=0.02)


@pytest.mark.parametrize(
    ("prompt", "output", "ctx", "want_prompt", "want_output"),
    [
        (100, 50, 2048, 100, 50),  # fits: unchanged
        (3000, 100, 2048, 1948, 100),  # long prompt: prompt truncated
        (100, 5000, 2048, 100, 1948),  # long output, short prompt: output cut
        (5000, 5000, 2048, 1024, 1024),  # both long: output to half, prompt the rest
        (0, 0, None, 1, 1),  # at least one token each
    ],
)
def test_clip_to_context(
    prompt: int, output: int, ctx: int | None, want_prompt: int, want_output: int
) -> None:
    p, o = clip_to_context(np.array([prompt]), np.array([output]), ctx)
    assert (int(p[0]), int(o[0])) == (want_prompt, want_output)


def test_workload_respects_max_context() -> None:
    workload = SyntheticWorkload(
        PoissonArrivals(5.0),
        prompt_lengths=LogNormalLengths(median_tokens=1500, sigma=1.0),
        output_lengths=LogNormalLengths(median_tokens=300, sigma=1.0),
        num_requests=5000,
        max_context_tokens=2048,
    )
    sizes = [r.prompt_tokens + r.max_tokens for _, r in workload.requests(0)]
    assert max(sizes) <= 2048 and min(sizes) >= 2
    assert workload.mean_prompt_tokens < 2048


def test_mix_priorities_users_and_slo() -> None:
    mix = RequestMix(
        priorities={"critical": 0.1, "normal": 0.9, "low": 0.0},
        num_users=20,
        user_distribution="zipf",
        zipf_s=1.2,
        slo_base_ms=100.0,
        slo_per_output_token_ms=10.0,
        slo_multiplier=2.0,
        model_name="llama-3-8b",
        cost_budget=0.5,
    )
    workload = SyntheticWorkload(
        PoissonArrivals(10.0), FixedLengths(64), UniformLengths(1, 100), mix, num_requests=20_000
    )
    reqs = [r for _, r in workload.requests(0)]
    share = sum(r.priority == RequestPriority.CRITICAL for r in reqs) / len(reqs)
    assert share == pytest.approx(0.1, abs=0.01)
    assert not any(r.priority == RequestPriority.LOW for r in reqs)
    users = [r.user_id for r in reqs]
    counts = {u: users.count(u) for u in set(users)}
    assert max(counts, key=counts.__getitem__) == "user-0" and len(counts) <= 20
    assert all(r.slo_deadline_ms == 2.0 * (100.0 + 10.0 * r.max_tokens) for r in reqs)
    assert {(r.model_name, r.cost_budget) for r in reqs} == {("llama-3-8b", 0.5)}


def test_a_mix_of_models_draws_each_at_its_share_and_leaves_the_rest_unchanged() -> None:
    def stream(**mix: Any) -> list[RequestMetadata]:
        workload = SyntheticWorkload(
            PoissonArrivals(10.0), FixedLengths(64), UniformLengths(1, 100),
            RequestMix(priorities={"high": 0.3, "normal": 0.7}, num_users=9, **mix),
            num_requests=20_000,
        )  # fmt: skip
        return [r for _, r in workload.requests(0)]

    mixed = stream(models={"opt-13b": 0.6, "llama-3-8b": 0.4})
    share = sum(r.model_name == "opt-13b" for r in mixed) / len(mixed)
    assert share == pytest.approx(0.6, abs=0.01)
    assert {r.model_name for r in mixed} == {"opt-13b", "llama-3-8b"}
    # the models are drawn after everything else: users, priorities and times as without
    plain = stream()
    assert [(r.user_id, r.priority) for r in mixed] == [(r.user_id, r.priority) for r in plain]


def test_fixed_slo_and_no_slo() -> None:
    fixed = SyntheticWorkload(
        PoissonArrivals(1.0),
        FixedLengths(8),
        FixedLengths(8),
        RequestMix(slo_ms=750.0),
        num_requests=10,
    )
    assert {r.slo_deadline_ms for _, r in fixed.requests(0)} == {750.0}
    none = SyntheticWorkload(PoissonArrivals(1.0), FixedLengths(8), FixedLengths(8), num_requests=3)
    assert {r.slo_deadline_ms for _, r in none.requests(0)} == {None}


def test_duration_and_count_stop_the_stream() -> None:
    by_time = _small(PoissonArrivals(100.0), duration_s=30.0)
    times = [t for t, _ in by_time.requests(0)]
    assert max(times) <= 30.0 and len(times) == pytest.approx(3000, rel=0.1)
    both = _small(PoissonArrivals(100.0), duration_s=30.0, num_requests=10)
    assert len(list(both.requests(0))) == 10


def test_arrivals_do_not_depend_on_lengths_or_mix() -> None:
    a = _small(PoissonArrivals(3.0), num_requests=100)
    b = SyntheticWorkload(PoissonArrivals(3.0), FixedLengths(5), FixedLengths(5), num_requests=100)
    assert [t for t, _ in a.requests(4)] == [t for t, _ in b.requests(4)]


def test_generator_is_lazy() -> None:
    workload = _small(PoissonArrivals(1000.0), num_requests=10_000_000)
    start = time.perf_counter()
    first = list(itertools.islice(workload.requests(0), 10))
    assert len(first) == 10 and time.perf_counter() - start < 2.0


def test_hundred_thousand_poisson_requests_generate() -> None:
    workload = _small(PoissonArrivals(1000.0), num_requests=100_000)
    last_t, count = 0.0, 0
    for t, _ in workload.requests(0):
        assert t >= last_t
        last_t, count = t, count + 1
    assert count == 100_000
    assert workload.mean_rate_rps == 1000.0


def test_estimates() -> None:
    workload = SyntheticWorkload(
        GammaArrivals(4.0, 2.0), UniformLengths(100, 300), FixedLengths(50), num_requests=1
    )
    assert (workload.mean_rate_rps, workload.mean_prompt_tokens, workload.mean_output_tokens) == (
        4.0,
        200.0,
        50.0,
    )
    assert workload.describe()["arrival"] == {"arrival": "gamma", "rate_rps": 4.0, "cv": 2.0}


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: PoissonArrivals(0.0), "rate_rps=0.0"),
        (lambda: GammaArrivals(1.0, cv=-1.0), "cv=-1.0"),
        (lambda: OnOffArrivals(1.0, mean_on_s=0.0, mean_off_s=1.0), "mean_on_s=0.0"),
        (lambda: RampArrivals(0.0, 0.0, ramp_s=10.0), "start_rate_rps=0"),
        (lambda: UniformLengths(10, 5), "high_tokens=5"),
        (lambda: LogNormalLengths(median_tokens=10), "sigma=None"),
        (lambda: LogNormalLengths(median_tokens=10, mean_tokens=20, sigma=1.0), "median_tokens"),
        (lambda: LogNormalLengths(median_tokens=100, p99_tokens=50), "p99_tokens=50"),
        (lambda: RequestMix(priorities={"urgent": 1.0}), "'urgent'"),
        (lambda: RequestMix(user_distribution="pareto"), "user_distribution='pareto'"),
        (lambda: RequestMix(slo_ms=100.0, slo_base_ms=10.0), "slo_ms=100.0"),
        (lambda: RequestMix(model_name="a", models={"b": 1.0}), "model_name='a' and models"),
        (lambda: RequestMix(models={"b": -1.0}), "models['b']"),
        (lambda: RequestMix(models={}), "models={}"),
        (lambda: SyntheticWorkload(PoissonArrivals(1.0), FixedLengths(1)), "output_lengths=None"),
        (
            lambda: SyntheticWorkload(
                PoissonArrivals(1.0), FixedLengths(1), FixedLengths(1), num_requests=0
            ),
            "num_requests=0",
        ),
    ],
)
def test_bad_parameters_name_the_field(build: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert fragment in str(info.value)


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_workload_config_instantiates(path: Path) -> None:
    config = OmegaConf.load(path)
    if "path:" in path.read_text() and not default_trace_dir().is_dir():
        pytest.skip(f"trace folder {default_trace_dir()} is absent (set CPSIM_TRACE_DIR)")
    workload = instantiate(config)
    first = list(itertools.islice(workload.requests(0), 50))
    assert len(first) == 50
    assert isinstance(workload, Workload)
    assert workload.mean_rate_rps is not None and workload.mean_rate_rps > 0
    assert isinstance(workload.describe(), dict)


def test_expected_configs_exist() -> None:
    names = {p.stem for p in CONF_DIR.glob("*.yaml")}
    assert {"poisson_sharegpt", "azure_conv", "mooncake_conv", "gamma_bursty", "tiny"} <= names


_SAMPLED = ("request_id", "user_id", "priority", "slo_deadline_ms", "max_tokens", "model_name",
            "cost_budget", "num_prompt_tokens", "prefix_block_ids")


def _checked(meta: RequestMetadata) -> RequestMetadata:
    """The same request through RequestMetadata's own, checked constructor: what a workload
    samples given, every other field left to its default."""
    return RequestMetadata(**{name: getattr(meta, name) for name in _SAMPLED})


def test_requests_built_without_the_checks_equal_checked_ones() -> None:
    mix = RequestMix(
        priorities={"high": 0.5, "normal": 0.5}, num_users=5, slo_base_ms=100.0,
        slo_per_output_token_ms=5.0, model_name="m", cost_budget=0.25,
    )
    synthetic = SyntheticWorkload(
        PoissonArrivals(10.0), UniformLengths(0, 50), UniformLengths(1, 50), mix,
        num_requests=300, batch_size=64,
    )
    several = SyntheticWorkload(
        PoissonArrivals(10.0), UniformLengths(0, 50), UniformLengths(1, 50),
        RequestMix(models={"a": 1.0, "b": 2.0}), num_requests=300, batch_size=64,
    )  # fmt: skip
    streams = [synthetic.requests(0), WORKLOADS["ramp"].requests(1), several.requests(2)]
    trace = resolve_trace_path("mooncake_fast25/conversation_trace.jsonl")
    if trace.is_file():  # prefix blocks from a trace's hash_ids
        streams.append(TraceWorkload(trace, max_requests=300, max_context_tokens=2048).requests(0))
    for stream in streams:
        for _, meta in itertools.islice(stream, 300):
            checked = _checked(meta)
            assert meta == checked
            assert [type(getattr(meta, f.name)) for f in dataclasses.fields(meta)] == [
                type(getattr(checked, f.name)) for f in dataclasses.fields(checked)
            ]


def test_a_bad_sampled_value_later_in_a_batch_gets_the_checked_error() -> None:
    lengths = np.array([5, 5, 0])  # the third request would have no output token
    batch = emit_batch(0, "r", np.array([0.0, 1.0, 2.0]), np.array([3, 3, 3]), lengths,
                       RequestMix(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_tokens"):
        list(batch)
