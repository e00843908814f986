"""Profile terms for CPU engines: mixed-step decodes, the serving slowdown, their fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cpsim.latency import StepBatch
from cpsim.profile_fit import StepSample, fit_terms
from cpsim.profiles import (
    ENGINE_PART,
    TERMS,
    ProfiledLatencyModel,
    available_profiles,
    load_profile,
    step_features,
)

ENGINE = {
    "step_s": 3e-3,
    "prefill_step_s": 1e-3,
    "prefill_token_s": 1e-5,
    "decode_seq_s": 2e-4,
    "decode_context_token_s": 1.5e-7,
    "mixed_decode_seq_s": 2e-4,
    "mixed_decode_context_token_s": 1e-7,
}
SERVING = {"serving_step_s": 5e-4, "serving_seq_s": 3e-5, "serving_engine_frac": 0.9,
           "serving_prefill_seq_s": 4e-3}

BATCHES = [
    StepBatch(512, 512**2, 0, 1),
    StepBatch(num_decode_seqs=8, decode_context_tokens=8000),
    StepBatch(256, 256**2, 128, 1, 16, 16_000),
    StepBatch(2000, 2000**2, 0, 1, 64, 70_000),
]


def _by_hand(terms: dict[str, float], batch: StepBatch) -> float:
    """The documented formula, written out once more."""
    t = {k: terms.get(k, 0.0) for k in TERMS}
    prefill = batch.num_prefill_tokens > 0
    engine = t["step_s"] + t["decode_seq_s"] * batch.num_decode_seqs
    engine += t["decode_context_token_s"] * batch.decode_context_tokens
    if prefill:
        engine += t["prefill_step_s"] + t["prefill_token_s"] * batch.num_prefill_tokens
        engine += t["mixed_decode_seq_s"] * batch.num_decode_seqs
        engine += t["mixed_decode_context_token_s"] * batch.decode_context_tokens
    serving = t["serving_step_s"] + t["serving_seq_s"] * (
        batch.num_decode_seqs + batch.num_prefill_seqs
    )
    if prefill:
        serving += t["serving_prefill_seq_s"] * batch.num_prefill_seqs
    return engine * (1.0 + t["serving_engine_frac"]) + serving


@pytest.mark.parametrize("batch", BATCHES)
def test_step_time_prices_mixed_decodes_and_scales_the_engine_part(batch: StepBatch) -> None:
    terms = ENGINE | SERVING
    model = ProfiledLatencyModel("m", "h", terms)
    assert model.step_time_s(batch) == pytest.approx(_by_hand(terms, batch), rel=1e-12)


def test_mixed_terms_are_paid_only_beside_prefill_tokens() -> None:
    base = ProfiledLatencyModel("m", "h", {"step_s": 1e-3})
    mixed = ProfiledLatencyModel("m", "h", {"step_s": 1e-3, "mixed_decode_seq_s": 1.0})
    decode = StepBatch(num_decode_seqs=4, decode_context_tokens=400)
    assert mixed.step_time_s(decode) == base.step_time_s(decode)
    both = StepBatch(64, 64**2, 0, 1, 4, 400)
    assert mixed.step_time_s(both) == pytest.approx(base.step_time_s(both) + 4.0)


@pytest.mark.parametrize(
    "name", [n for n in available_profiles() if not n.startswith("vllm-cpu")]  # measured ones
)
def test_new_terms_default_to_zero_in_published_profiles(name: str) -> None:
    model = load_profile(name)
    new = ("mixed_decode_seq_s", "mixed_decode_context_token_s", "serving_engine_frac",
           "serving_prefill_seq_s")
    for term in new:
        assert model.coefficients[term] == 0.0
    assert model.ingress_s == model.egress_s == 0.0
    for batch in BATCHES:
        terms = model._terms(batch.num_decode_seqs)
        old = dict(zip(TERMS, terms, strict=True))
        expected = _by_hand(old, batch) + old["step_token_sq_s"] * float(
            batch.num_prefill_tokens + batch.num_decode_seqs
        ) ** 2 + (
            old["prefill_token_sq_s"] * batch.sum_sq_prefill_tokens
            + old["prefill_context_token_s"] * batch.prefill_context_tokens
            + old["serving_prefill_token_s"] * batch.num_prefill_tokens
            if batch.num_prefill_tokens
            else 0.0
        )
        assert model.step_time_s(batch) == pytest.approx(max(0.0, expected), rel=1e-9)


@pytest.mark.parametrize("terms", [ENGINE | SERVING, ENGINE, SERVING | {"step_s": 2e-3}])
def test_closed_form_decode_matches_step_prices(terms: dict[str, float]) -> None:
    model = ProfiledLatencyModel("m", "h", terms)
    first, increment = model.decode_step_linear_s(12, 9000, 12)  # type: ignore[misc]
    for i in range(4):
        batch = StepBatch(num_decode_seqs=12, decode_context_tokens=9000 + 12 * i)
        assert first + increment * i == pytest.approx(model.step_time_s(batch), rel=1e-12)
    contexts = np.array([100, 5000])
    assert model.decode_step_times_s(12, contexts).tolist() == pytest.approx(
        [model.step_time_s(StepBatch(num_decode_seqs=12, decode_context_tokens=int(c)))
         for c in contexts]
    )


def test_features_have_one_entry_per_term() -> None:
    assert len(step_features(BATCHES[2])) == len(TERMS)
    assert set(ENGINE_PART) | {t for t in TERMS if t.startswith("serving_")} == set(TERMS)


def test_fit_recovers_the_serving_slowdown_over_a_fixed_engine_part() -> None:
    truth = ProfiledLatencyModel("m", "h", ENGINE | SERVING)
    samples = [StepSample("s", b, truth.step_time_s(b)) for b in BATCHES]
    samples += [
        StepSample("s", b, truth.step_time_s(b))
        for b in (StepBatch(num_decode_seqs=1, decode_context_tokens=50),
                  StepBatch(num_decode_seqs=64, decode_context_tokens=64 * 1000))
    ]
    samples += [StepSample("s", b, truth.step_time_s(b))
                for b in (StepBatch(100, 100**2, 0, 1), StepBatch(1000, 1000**2, 0, 2))]
    fit = fit_terms(samples, ("serving_step_s", "serving_seq_s", "serving_engine_frac",
                              "serving_prefill_seq_s"), fixed=ENGINE)
    for term, value in SERVING.items():
        assert fit.coefficients[term] == pytest.approx(value, rel=1e-6)
    assert fit.max_rel_error < 1e-9


def test_fit_recovers_mixed_terms() -> None:
    truth = ProfiledLatencyModel("m", "h", ENGINE)
    batches = [StepBatch(n, n * n, 0, 1) for n in (64, 512, 1500)]
    batches += [StepBatch(num_decode_seqs=b, decode_context_tokens=b * c)
                for b in (1, 8, 64) for c in (256, 1024)]
    batches += [StepBatch(p, p * p, 0, 1, d, d * c)
                for p in (128, 1024) for d in (8, 64) for c in (256, 1024)]
    samples = [StepSample("x", b, truth.step_time_s(b)) for b in batches]
    fit = fit_terms(samples, tuple(ENGINE))
    for term, value in ENGINE.items():
        assert fit.coefficients[term] == pytest.approx(value, rel=1e-6, abs=1e-12)


def test_live_steps_become_mean_periods_by_shape_with_interpolated_contexts() -> None:
    import pandas as pd

    from backends.vllm.profile_live import live_step_samples

    # a: prompt 100, 11 tokens, decoding over [1.0, 1.1] (manager time); nothing after 1.1
    records = pd.DataFrame({
        "arrival_time_s": [0.99], "first_token_time_s": [1.0], "finish_time_s": [1.1],
        "num_prompt_tokens": [100], "num_output_tokens": [11],
    })
    offset = 10.0  # monotonic time = manager time + 10
    steps = [(11.0, 1, 100, 0, 5.0)]
    steps += [(11.0 + 0.01 * i, 0, 0, 1, 8.0) for i in range(1, 10)]
    steps += [(12.0, 0, 0, 1, 8.0)]  # after an idle engine: left out
    samples = live_step_samples(steps, records, offset, min_steps=3)
    assert [s.kind for s in samples] == ["serving_live_decode"]
    (decode,) = samples
    assert decode.num_repeats == 9 and decode.batch.num_decode_seqs == 1
    assert 101 <= decode.batch.decode_context_tokens <= 111
    assert decode.time_s == pytest.approx(0.01)


def test_live_runs_saved_beside_the_profile_rebuild_the_same_samples(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from backends.vllm.profile_live import LiveRun
    from backends.vllm.profiler import live_file

    records = pd.DataFrame({
        "arrival_time_s": [0.0, 0.05], "first_token_time_s": [0.02, 0.1],
        "finish_time_s": [1.0, 1.2], "num_prompt_tokens": [100, 300],
        "num_output_tokens": [50, 60],
    })
    steps = [(0.02, 1, 100, 0, 5.0)] + [
        (0.02 + 0.01 * i, 0, 0, 1 if i < 8 else 2, 5.0) for i in range(1, 100)]
    run = LiveRun(1.5, steps, records, 0.0)
    path = live_file(tmp_path / "profile.yaml")
    assert path.name == "profile.live.json"
    path.write_text(json.dumps([run.to_dict()]))
    (back,) = [LiveRun.from_dict(d) for d in json.loads(path.read_text())]
    assert back.samples() == run.samples()
    assert [s.batch.num_decode_seqs for s in run.samples()] == [1, 2]


@pytest.mark.parametrize(
    ("env", "num_cpus", "expected"),
    [
        ({"VLLM_CPU_OMP_THREADS_BIND": "0"}, None, {"OMP_NUM_THREADS": "1", "OMP_PLACES": "{0}"}),
        ({"VLLM_CPU_OMP_THREADS_BIND": "0-2,5|6"}, None,
         {"OMP_NUM_THREADS": "4", "OMP_PLACES": "{0,1,2,5}"}),
        ({}, 4, {"OMP_NUM_THREADS": "3", "OMP_PLACES": "{0,1,2}"}),
        ({"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, None, {}),
    ],
)
def test_in_process_engine_gets_the_served_workers_threads(
    env: dict[str, str], num_cpus: int | None, expected: dict[str, str]
) -> None:
    from backends.vllm.profile_measure import worker_thread_env

    got = worker_thread_env(env, num_cpus)
    assert {k: v for k, v in got.items() if k != "OMP_PROC_BIND"} == expected


def test_serving_path_round_trips_and_adds_to_predicted_ttft(tmp_path: Path) -> None:
    from cpsim.latency import request_path_s
    from cpsim.profiles import save_profile
    from tests.sim.test_latency_models import instance_view, request_view

    model = ProfiledLatencyModel("m", "h", ENGINE | SERVING, ingress_s=0.0012, egress_s=0.002)
    back = load_profile(save_profile(model, tmp_path / "p.yaml"))
    assert (back.ingress_s, back.egress_s) == (0.0012, 0.002) == request_path_s(back)
    assert request_path_s(object()) == (0.0, 0.0)
    plain = ProfiledLatencyModel("m", "h", ENGINE | SERVING)
    assert "ingress_s" not in plain.to_dict()  # engine-only files stay as they were
    request, instance = request_view(300, 20), instance_view(num_running=4)
    with_path, without = model.predict(request, instance), plain.predict(request, instance)
    assert with_path.ttft_s == pytest.approx(without.ttft_s + 0.0032)
    assert with_path.tpot_s == without.tpot_s


@pytest.mark.parametrize(("key", "value"), [("ingress_s", -0.001), ("egress_s", float("inf")),
                                            ("egress_s", "2ms")])
def test_a_bad_serving_path_in_a_profile_file_names_the_field(key: str, value: object) -> None:
    data = ProfiledLatencyModel("m", "h", ENGINE).to_dict() | {key: value}
    with pytest.raises(ValueError, match=key):
        ProfiledLatencyModel.from_dict(data)


def test_path_samples_take_ingress_only_from_requests_that_found_the_engine_idle() -> None:
    import pandas as pd

    from backends.vllm.profile_path import EGRESS, INGRESS, fit_path, path_samples

    records = pd.DataFrame({  # a alone; b arrives while a runs; c alone again
        "arrival_time_s": [0.0, 0.05, 1.0],
        "finish_time_s": [0.5, 0.6, 1.2],
        "engine_queued_s": [0.002, 0.061, 1.003],
        "engine_first_token_s": [0.020, 0.080, 1.030],
        "first_token_time_s": [0.0215, 0.0820, 1.0325],
    }, index=["a", "b", "c"])
    samples = path_samples(records)
    ingress = [s.time_s for s in samples if s.kind == INGRESS]
    egress = [s.time_s for s in samples if s.kind == EGRESS]
    assert ingress == pytest.approx([0.002, 0.003])  # not b's 11 ms (the step in flight)
    assert egress == pytest.approx([0.0015, 0.002, 0.0025])
    ingress_s, egress_s, report = fit_path(samples)
    assert (ingress_s, egress_s) == pytest.approx((0.0025, 0.002))
    assert report[INGRESS]["num_samples"] == 2 and report[EGRESS]["median_ms"] == 2.0
    assert fit_path([]) == (0.0, 0.0, {})


@pytest.mark.parametrize("batch", BATCHES)
def test_a_scaled_profile_prices_every_step_and_the_path_by_the_factor(batch: StepBatch) -> None:
    model = ProfiledLatencyModel("m", "h", ENGINE | SERVING, ingress_s=0.002, egress_s=0.001,
                                 provenance={"source": "test"})
    slow = model.scaled(1.25)
    assert slow.step_time_s(batch) == pytest.approx(1.25 * model.step_time_s(batch))
    assert (slow.ingress_s, slow.egress_s) == pytest.approx((0.0025, 0.00125))
    assert slow.coefficients["serving_engine_frac"] == SERVING["serving_engine_frac"]
    assert slow.provenance == {"source": "test", "scaled_by": 1.25}
    assert slow.scaled(2.0).provenance["scaled_by"] == 2.5  # relative to the measured profile
    assert model.step_time_s(batch) == pytest.approx(_by_hand(ENGINE | SERVING, batch))


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_scale_factor_names_the_value(factor: float) -> None:
    # (a non-number is a TypeError in the compiled build, before the method runs)
    with pytest.raises(ValueError, match="factor="):
        ProfiledLatencyModel("m", "h", ENGINE).scaled(factor)
