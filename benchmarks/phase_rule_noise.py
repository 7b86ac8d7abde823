"""The phase rule's evidence test, measured: how often pure noise gets phases, and what the rule finds on the
reference run, the demo's 8 epoch means and a scripted short fast-then-slow curve. It compares the rule of
phi2tutor.phases (log-space rate, mean-based log noise, EVIDENCE_Z 5) with the rule it replaced (linear
relative rate, median-based relative noise, 4 standard errors, every slow-down measured from the run's peak) and two steps between
them (with the current rule's phase-own peak).

    python benchmarks/phase_rule_noise.py [--runs 300]

One `RESULT rule=... ` line per rule: the share of pure-noise series (relative noise 2% around ln 4) that
got a boundary, for each (points, window), and the boundaries found on the curves. Last line: the
current rule's figures.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi2tutor.phases import (  # noqa: E402
    DEFAULT_FINE_TUNING_BELOW,
    DEFAULT_STABILIZATION_BELOW,
    EVIDENCE_Z,
    PhaseTracker,
    relative_improvement,
)
from tests.reference_run import reference_loss_series  # noqa: E402

# The demo's epoch means (README, "The demo"), and a scripted curve: 6 epochs halving, then 6 falling 8% each.
DEMO_EPOCH_MEANS = [1.1669, 0.1079, 0.0204, 0.00807, 0.00401, 0.00344, 0.00336, 0.00335]
FAST_THEN_SLOW = [2.0 * 0.5**epoch for epoch in range(6)] + [0.0625 * 0.92**epoch for epoch in range(1, 7)]
NOISE_SHAPES = ((8, 3), (12, 3), (20, 5), (60, 15), (400, 15))


def _median_noise(values: Sequence[float], log: bool) -> float:
    """The noise estimate the old rule used: the median |second difference| (linear ones relative to the
    middle point), over 0.6745 sqrt(6)."""
    array = np.asarray([v for v in values if math.isfinite(v) and v > 0], dtype=np.float64)
    if len(array) < 3:
        return 0.0
    if log:
        logs = np.log(array)
        second = np.abs(logs[:-2] - 2 * logs[1:-1] + logs[2:])
    else:
        second = np.abs(array[:-2] - 2 * array[1:-1] + array[2:]) / array[1:-1]
    return float(np.median(second)) / (0.6745 * math.sqrt(6))


class LinearMedianTracker(PhaseTracker):
    """The rule before: linear relative rate of a fitted line, median relative noise, 4 standard errors,
    thresholds 0.4 and 0.08, every boundary's slow-down measured from the run's peak."""

    evidence_z = 4.0

    def evidence_peak(self):
        return self.peak_improvement_rate

    def rate_of(self, values):
        improvement = relative_improvement(values, self.window, self.mode)
        return None if improvement is None else improvement / (self.window - 1)

    def noise_of(self, values):
        return _median_noise(values, log=False)


class LogMedianTracker(PhaseTracker):
    """Log-space rate, median log noise, 4 standard errors."""

    evidence_z = 4.0

    def noise_of(self, values):
        return _median_noise(values, log=True)


class LogMeanZ4Tracker(PhaseTracker):
    """Log-space rate, mean log noise (the current estimate), 4 standard errors."""

    evidence_z = 4.0


RULES = {
    "linear_median_z4_before": (LinearMedianTracker, 0.4, 0.08),
    "log_median_z4": (LogMedianTracker, DEFAULT_FINE_TUNING_BELOW, DEFAULT_STABILIZATION_BELOW),
    "log_mean_z4": (LogMeanZ4Tracker, DEFAULT_FINE_TUNING_BELOW, DEFAULT_STABILIZATION_BELOW),
    f"log_mean_z{EVIDENCE_Z:g}_now": (PhaseTracker, DEFAULT_FINE_TUNING_BELOW, DEFAULT_STABILIZATION_BELOW),
}


def boundaries(rule: str, values: Sequence[float], window: int) -> list[int]:
    tracker_class, fine_tuning_below, stabilization_below = RULES[rule]
    tracker = tracker_class(window, fine_tuning_below, stabilization_below)
    for position, value in enumerate(values, start=1):
        tracker.update(position, value)
    return tracker.boundaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="pure-noise series per (points, window)")
    args = parser.parse_args()
    for rule in RULES:
        pairs = []
        for points, window in NOISE_SHAPES:
            with_phases = 0
            for seed in range(args.runs):
                noise = np.random.default_rng(seed).standard_normal(points)
                series = [float(v) for v in math.log(4) * (1 + 0.02 * noise)]
                with_phases += bool(boundaries(rule, series, window))
            pairs.append(f"noise_{points}pts_w{window}_pct={100 * with_phases / args.runs:.1f}")
        curves = {
            "reference_w15": boundaries(rule, reference_loss_series(), 15),
            "reference_1pct_noise_w15": boundaries(rule, reference_loss_series(noise=0.01, seed=0), 15),
            "demo_w3": boundaries(rule, DEMO_EPOCH_MEANS, 3),
            "fast_then_slow_12pts_w3": boundaries(rule, FAST_THEN_SLOW, 3),
        }
        pairs += [f"{name}={'/'.join(map(str, found)) or 'none'}" for name, found in curves.items()]
        print(f"RESULT rule={rule} runs={args.runs} " + " ".join(pairs), flush=True)


if __name__ == "__main__":
    main()
