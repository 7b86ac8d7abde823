"""Tests of phi2tutor.phases: phase statistics, the causal phase rule, and the plateau test."""

from __future__ import annotations

import math

import pytest

from phi2tutor.errors import Phi2TutorError
from phi2tutor.phases import (
    PHASE_NAMES,
    PhaseTracker,
    describe_trend,
    detect_phases,
    improvement_rate,
    improvement_rates,
    is_plateau,
    phase_index_of,
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
    assert found[0].improvement_rate < 0.4 * found[0].peak_improvement_rate
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

    # The second boundary waits a full window after the first (no phase shorter than a window).
    assert analysis.boundaries == (6, 11)
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
    assert improvement_rate([10.0, 9.0, 8.0, 7.0], 4) == pytest.approx(0.1)
    rates = improvement_rates([10.0, 9.0, 8.0, 7.0], 3)
    assert math.isnan(rates[0]) and math.isnan(rates[1])
    assert rates[2:] == pytest.approx([0.1, 1 / 9])  # (10 - 8) / 10 / 2, (9 - 7) / 9 / 2


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
    assert relative_noise(noisy) == pytest.approx(0.05, rel=0.1)
    assert relative_noise([1.0, 0.5, 0.25, 0.125]) > 0  # curvature counts as scatter: the test gets stricter


def test_a_short_fast_fall_is_a_fall_not_noise():
    # The demo's 8 epoch means: in linear terms the curvature of this fall reads as 57% noise per point.
    demo_epochs = [1.1669, 0.1079, 0.0204, 0.00807, 0.00401, 0.00344, 0.00336, 0.00335]
    trend = describe_trend(demo_epochs)
    assert trend.kind == "fell" and trend.standard_errors > 4.0
    assert trend.change_pct == pytest.approx(100 * (1.1669 - 0.00335) / 1.1669)
    assert describe_trend(demo_epochs[::-1]).kind == "rose"
