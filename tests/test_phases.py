"""Tests of phi2tutor.phases: phase statistics, the causal phase rule, and the plateau test."""

from __future__ import annotations

import math

import pytest

from phi2tutor.errors import Phi2TutorError
from phi2tutor.phases import (
    DEFAULT_FINE_TUNING_BELOW,
    EVIDENCE_Z,
    PHASE_NAMES,
    PhaseTracker,
    describe_trend,
    detect_phases,
    improvement_rate,
    improvement_rates,
    is_plateau,
    log_noise,
    phase_index_of,
    rate_pct,
    relative_improvement,
    relative_noise,
    summarize_phases,
)
from tests.reference_run import (
    REFERENCE_BOUNDARIES,
    REFERENCE_IMPROVEMENT_PCT,
    REFERENCE_LOSSES,
    REFERENCE_TOTAL_IMPROVEMENT_PCT,
    reference_loss_series,
)


def test_reference_series_passes_through_the_reported_losses_and_only_falls():
    losses = reference_loss_series()
    assert len(losses) == 250
    assert {epoch: losses[epoch - 1] for epoch in REFERENCE_LOSSES} == REFERENCE_LOSSES
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))


def test_reference_statistics_at_the_analysis_boundaries():
    analysis = summarize_phases(reference_loss_series(), REFERENCE_BOUNDARIES)

    assert [phase.name for phase in analysis.phases] == list(PHASE_NAMES)
    assert [(p.first_epoch, p.last_epoch) for p in analysis.phases] == [(1, 50), (51, 100), (101, 250)]
    assert [(p.start_loss, p.end_loss) for p in analysis.phases] == [
        (2.6141, 0.1035),
        (0.1035, 0.0644),
        (0.0644, 0.057),
    ]
    assert [round(p.improvement_pct, 2) for p in analysis.phases] == list(REFERENCE_IMPROVEMENT_PCT)
    assert round(analysis.total_improvement_pct, 2) == REFERENCE_TOTAL_IMPROVEMENT_PCT
    # The analysis's "96.04% of the total improvement" is phase 1's own improvement; its share is 98.18%.
    assert [round(p.share_of_total_reduction_pct, 2) for p in analysis.phases] == [98.18, 1.53, 0.29]
    assert sum(p.share_of_total_reduction_pct for p in analysis.phases) == pytest.approx(100.0)
    assert (analysis.start_loss, analysis.end_loss, analysis.unit) == (2.6141, 0.057, "epoch")


def test_default_rule_finds_the_reference_boundaries():
    analysis = detect_phases(reference_loss_series())

    assert analysis.boundaries == (50, 101)
    for found, reported in zip(analysis.boundaries, REFERENCE_BOUNDARIES):
        assert abs(found - reported) <= 10
    assert [(p.first_epoch, p.last_epoch) for p in analysis.phases] == [(1, 50), (51, 101), (102, 250)]
    assert [round(p.improvement_pct, 2) for p in analysis.phases] == [96.04, 38.02, 11.14]


@pytest.mark.parametrize("seed", range(5))
def test_default_rule_tolerates_one_percent_noise(seed):
    boundaries = detect_phases(reference_loss_series(noise=0.01, seed=seed)).boundaries

    assert len(boundaries) == 2
    assert abs(boundaries[0] - 50) <= 10 and abs(boundaries[1] - 100) <= 10


def test_rule_is_causal_every_prefix_sees_the_boundaries_reached_so_far():
    losses = reference_loss_series(noise=0.01, seed=3)
    full = detect_phases(losses).boundaries

    for length in range(1, len(losses) + 1):
        prefix = detect_phases(losses[:length])
        assert prefix.boundaries == tuple(b for b in full if b <= length), length


def test_boundary_at_the_last_point_has_no_phase_yet():
    losses = reference_loss_series()
    analysis = detect_phases(losses[:50])

    assert analysis.boundaries == (50,)
    assert [(p.name, p.first_epoch, p.last_epoch) for p in analysis.phases] == [("rapid learning", 1, 50)]


def test_tracker_online_with_a_restart_matches_the_offline_analysis():
    losses = reference_loss_series(noise=0.01, seed=1)
    offline = detect_phases(losses)

    first = PhaseTracker()
    transitions = [first.update(epoch, loss) for epoch, loss in enumerate(losses[:75], start=1)]
    state = first.state_dict()
    resumed = PhaseTracker()
    resumed.load_state_dict(state)
    assert resumed.phase_name == "fine-tuning"
    transitions += [resumed.update(epoch, loss) for epoch, loss in enumerate(losses[75:], start=76)]

    found = [t for t in transitions if t is not None]
    assert [t.boundary for t in found] == list(offline.boundaries)
    assert [t.phase_name for t in found] == ["fine-tuning", "stabilization"]
    assert found[0].loss_at_boundary == losses[found[0].boundary - 1]
    assert found[0].improvement_rate < DEFAULT_FINE_TUNING_BELOW * found[0].peak_improvement_rate
    assert resumed.analysis() == offline
    assert [
        resumed.phase_index_of(e) for e in (1, offline.boundaries[0], offline.boundaries[0] + 1, 250)
    ] == [
        0,
        0,
        1,
        2,
    ]


def test_step_series_reports_steps():
    losses = reference_loss_series()
    steps = [50 * epoch for epoch in range(1, 251)]

    analysis = detect_phases(losses, steps, unit="step")

    assert analysis.boundaries == (2500, 5050)
    assert (analysis.phases[1].first_epoch, analysis.phases[1].last_epoch) == (2550, 5050)
    assert analysis.unit == "step"


def test_too_short_or_flat_series_stays_in_the_first_phase():
    short = detect_phases([2.0, 1.5, 1.2])
    assert short.boundaries == ()
    assert [(p.name, p.first_epoch, p.last_epoch) for p in short.phases] == [("rapid learning", 1, 3)]
    assert short.phases[0].improvement_pct == pytest.approx(40.0)
    assert short.phases[0].share_of_total_reduction_pct == pytest.approx(100.0)

    assert detect_phases([1.0] * 40).boundaries == ()


def test_rising_metric_in_max_mode():
    accuracy = [0.9 - 0.8 * math.exp(-epoch / 5) for epoch in range(60)]

    analysis = detect_phases(accuracy, window=5, mode="max")

    # Log-space rates of a rise toward 0.9: under 0.27 of the peak after epoch 8. The second boundary waits
    # for evidence: the fast start's curvature counts as noise (it only makes the test stricter), and the
    # fine-tuning phase's own rate stands 5 standard errors above it only from epoch 39.
    assert analysis.boundaries == (8, 39)
    assert analysis.phases[0].improvement_pct > 0
    assert analysis.total_improvement_pct == pytest.approx(100 * (accuracy[-1] - 0.1) / 0.1)


def test_relative_improvement_measures_the_fitted_line():
    assert relative_improvement([10.0, 9.0, 8.0, 7.0], 4) == pytest.approx(0.3)
    assert relative_improvement([5.0, 10.0, 9.0, 8.0, 7.0], 4) == pytest.approx(0.3)
    assert relative_improvement([10.0, 9.0, 8.0, 7.0], 2) == pytest.approx(1 / 8)
    assert relative_improvement([1.0, 2.0, 3.0], 3, mode="max") == pytest.approx(2.0)
    assert relative_improvement([1.0, 2.0, 3.0], 3) == pytest.approx(-2.0)
    # A drop at the last point moves the fitted line (8.8%) less than the raw endpoints (10%).
    assert relative_improvement([1.0, 1.0, 1.0, 0.9], 4) == pytest.approx(0.09 / 1.02)
    assert relative_improvement([1.0, 2.0], 3) is None
    assert math.isnan(relative_improvement([1.0, math.nan, 1.0], 3))
    assert relative_improvement([0.0, 0.0, 0.0], 3) == 0.0


def test_improvement_rate_is_the_log_slope():
    # Halving at every check: the log falls by ln 2 per check, the fitted exponential 50% per check.
    assert improvement_rate([8.0, 4.0, 2.0, 1.0], 4) == pytest.approx(math.log(2))
    assert rate_pct(math.log(2)) == pytest.approx(50.0)
    assert improvement_rate([1.0, 2.0, 4.0], 3, mode="max") == pytest.approx(math.log(2))
    assert rate_pct(math.log(2), mode="max") == pytest.approx(100.0)
    assert improvement_rate([1.0, 2.0, 4.0], 3) == pytest.approx(-math.log(2))
    rates = improvement_rates([16.0, 8.0, 4.0, 1.0], 3)
    assert math.isnan(rates[0]) and math.isnan(rates[1])
    assert rates[2:] == pytest.approx([math.log(2), math.log(8) / 2])  # ln(16 / 4) / 2, ln(8 / 1) / 2
    assert improvement_rate([1.0, 2.0], 3) is None
    # A value with no logarithm (0, negative, NaN) leaves its windows unjudged.
    assert math.isnan(improvement_rate([1.0, 0.0, 1.0], 3))
    assert math.isnan(improvement_rate([1.0, -1.0, 1.0], 3))
    assert math.isnan(improvement_rate([1.0, math.nan, 1.0], 3))


def test_plateau_test():
    barely = [1.0 - 0.0005 * i for i in range(10)]  # 0.45% over 10 points
    clearly = [1.0 - 0.005 * i for i in range(10)]  # 4.5% over 10 points

    assert is_plateau(barely, 10, 0.01)
    assert not is_plateau(clearly, 10, 0.01)
    assert not is_plateau(barely[:9], 10, 0.01)  # not enough history to tell
    assert is_plateau(list(reversed(barely)), 10, 0.0)  # got worse
    assert not is_plateau([0.5, 0.6, 0.7], 3, 0.01, mode="max")
    assert is_plateau([0.70, 0.701, 0.70], 3, 0.01, mode="max")
    assert not is_plateau([1.0, math.inf, 1.0], 3, 0.01)


def test_phase_index_of():
    assert [phase_index_of(e, (50, 100)) for e in (1, 50, 51, 100, 101)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    ("boundaries", "message"),
    [((100, 50), "must increase"), ((5, 10, 20), "at most 2"), ((300,), "must be one of")],
)
def test_summarize_rejects_bad_boundaries(boundaries, message):
    with pytest.raises(ValueError, match=message):
        summarize_phases(reference_loss_series(), boundaries)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 1}, r"window=1 is out of range.*integer >= 2"),
        ({"window": 2.5}, r"window=2.5 is out of range"),
        ({"fine_tuning_below": 1.5}, r"fine_tuning_below=1.5 is out of range.*strictly between 0 and 1"),
        ({"stabilization_below": 0.0}, r"stabilization_below=0.0 is out of range"),
        ({"fine_tuning_below": 0.05, "stabilization_below": 0.1}, r"stabilization_below=0.1 must be smaller"),
        ({"mode": "avg"}, r"mode='avg' is not valid.*'min'.*'max'"),
    ],
)
def test_bad_phase_options_name_the_option_and_range(options, message):
    with pytest.raises(Phi2TutorError, match=message):
        PhaseTracker(**options)


@pytest.mark.parametrize("seed", range(5))
def test_pure_noise_has_no_phases_and_a_flat_trend(seed):
    import numpy as np

    at_chance = list(np.log(4) * (1 + 0.01 * np.random.default_rng(seed).standard_normal(400)))

    assert detect_phases(at_chance).boundaries == ()
    assert describe_trend(at_chance).kind == "flat"


def test_trend_of_a_falling_a_rising_and_a_short_series():
    falling = reference_loss_series(noise=0.01, seed=0)
    assert describe_trend(falling).kind == "fell"
    assert describe_trend(falling[::-1]).kind == "rose"
    assert describe_trend([1.0, 0.9, 0.8]).kind == "too_few_points"


def test_noise_estimate_is_the_relative_scatter():
    import numpy as np

    noisy = list(2.0 * (1 + 0.05 * np.random.default_rng(0).standard_normal(2000)))
    assert relative_noise(noisy) == pytest.approx(0.05, rel=0.05)
    assert log_noise(noisy) == pytest.approx(0.05, rel=0.05)
    # An exponential fall is a straight line in log space: no noise; in linear terms its curvature counts.
    assert log_noise([1.0, 0.5, 0.25, 0.125]) == pytest.approx(0.0, abs=1e-12)
    assert relative_noise([1.0, 0.5, 0.25, 0.125]) > 0.2
    assert log_noise([1.0, 0.0, math.nan, 0.5, 0.25, 0.125]) == pytest.approx(0.0, abs=1e-12)


def test_a_short_fast_fall_is_a_fall_not_noise():
    # The demo's 8 epoch means: in linear terms the curvature of this fall reads as 57% noise per point.
    demo_epochs = [1.1669, 0.1079, 0.0204, 0.00807, 0.00401, 0.00344, 0.00336, 0.00335]
    trend = describe_trend(demo_epochs)
    assert trend.kind == "fell" and trend.standard_errors > 4.0
    assert trend.change_pct == pytest.approx(100 * (1.1669 - 0.00335) / 1.1669)
    assert describe_trend(demo_epochs[::-1]).kind == "rose"


# ------------------------------------------------------------------ phases only with evidence, short runs
DEMO_EPOCH_MEANS = [1.1669, 0.1079, 0.0204, 0.00807, 0.00401, 0.00344, 0.00336, 0.00335]


def test_the_demos_short_fast_then_slow_fall_has_one_boundary():
    # Window 3 as configs/demo.yaml: in log space the fall of the first five epochs (5.5 of the log's 5.9)
    # and the slow-down after it stand above the noise; in linear terms (the rule before) they did not.
    analysis = detect_phases(DEMO_EPOCH_MEANS, window=3)
    assert analysis.boundaries == (6,)
    assert [(p.name, p.first_epoch, p.last_epoch) for p in analysis.phases] == [
        ("rapid learning", 1, 6),
        ("fine-tuning", 7, 8),
    ]
    tracker = PhaseTracker(window=3)
    transitions = [tracker.update(epoch, loss) for epoch, loss in enumerate(DEMO_EPOCH_MEANS, start=1)]
    found = [t for t in transitions if t is not None]
    assert [t.boundary for t in found] == [6]
    # The evidence: the fall from the peak rate stands over EVIDENCE_Z * sqrt(2) standard errors.
    assert found[0].peak_improvement_rate - found[0].improvement_rate > (
        EVIDENCE_Z * math.sqrt(2) * found[0].rate_standard_error
    )
    assert found[0].rate_standard_error == pytest.approx(
        log_noise(DEMO_EPOCH_MEANS[:6]) / math.sqrt(3 * (9 - 1) / 12)
    )


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.03])
@pytest.mark.parametrize("seed", range(5))
def test_a_scripted_fast_then_slow_short_series_has_one_boundary(noise, seed):
    import numpy as np

    # 12 epochs: halving for 6, then 8% a epoch: the slow rate is 12% of the fast one, between the
    # fine-tuning (27%) and stabilization (4.7%) fractions, so one boundary, two checks after the knee.
    curve = [2.0 * 0.5**epoch for epoch in range(6)] + [0.0625 * 0.92**epoch for epoch in range(1, 7)]
    noisy = list(np.asarray(curve) * (1 + noise * np.random.default_rng(seed).standard_normal(len(curve))))

    assert detect_phases(noisy, window=3).boundaries == (8,)


@pytest.mark.parametrize(("points", "window"), [(8, 3), (12, 3), (20, 5), (60, 15)])
def test_short_pure_noise_has_no_phases(points, window):
    import numpy as np

    with_phases = [
        seed
        for seed in range(100)
        if detect_phases(
            list(np.log(4) * (1 + 0.02 * np.random.default_rng(seed).standard_normal(points))), window=window
        ).boundaries
    ]
    assert with_phases == []


def test_a_state_saved_by_the_linear_rule_gets_its_peak_recomputed_in_log_space():
    losses = reference_loss_series()[:60]
    tracker = PhaseTracker()
    for epoch, loss in enumerate(losses, start=1):
        tracker.update(epoch, loss)
    state = tracker.state_dict()
    assert state["rate_space"] == "log"
    old = {key: value for key, value in state.items() if key != "rate_space"}
    old["peak_improvement_rate"] = 0.0123  # a linear rate: other units
    resumed = PhaseTracker()
    resumed.load_state_dict(old)
    assert resumed.peak_improvement_rate == pytest.approx(tracker.peak_improvement_rate)
    assert resumed.boundaries == tracker.boundaries == [50]


@pytest.mark.parametrize("seed", range(5))
def test_noise_after_a_fast_fall_is_not_a_further_phase(seed):
    import numpy as np

    # 8 epochs halving, then 100 epochs of 3% noise around a flat level. Against the run's peak every
    # noisy window is a slow-down (the rule before named stabilization at epoch 16); the fine-tuning phase
    # never improved beyond its noise, so there is no second boundary.
    flat = 0.0156 * (1 + 0.03 * np.random.default_rng(seed).standard_normal(100))
    analysis = detect_phases([2.0 * 0.5**epoch for epoch in range(8)] + list(flat), window=5)

    assert analysis.boundaries == (11,)


def test_a_fall_within_the_first_tenth_is_a_fall_from_the_first_point():
    import numpy as np

    # 0.83, 0.49, then 58 points of 5% noise around 0.16: the first tenth's median is already at the end
    # level, but the first point stands far above it.
    flat = list(0.16 * (1 + 0.05 * np.random.default_rng(0).standard_normal(58)))
    trend = describe_trend([0.83, 0.49] + flat)
    assert trend.kind == "fell" and trend.from_first and trend.first == 0.83
    assert trend.change_pct == pytest.approx(100 * (0.83 - trend.tail) / 0.83)
    assert trend.standard_errors > EVIDENCE_Z
    # Without the fall it is flat, and the first point is not singled out.
    assert describe_trend(flat).kind == "flat" and not describe_trend(flat).from_first
