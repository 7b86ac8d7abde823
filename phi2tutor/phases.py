"""Loss-trend analysis of a training run: learning-phase segmentation, the trend test and plateau tests.

Pure functions on plain Python/numpy data, no Lightning import. The PhaseDetection and PlateauStopping
callbacks and the training report all call these, so the online and offline answers are the same.

Both tests judge a positive series (a loss) in log space. A loss falls multiplicatively: a smooth
near-exponential fall is a straight line in log space, so its curvature is not mistaken for noise and its
rate is not capped (in linear terms a least-squares line through 1.17, 0.11, 0.02 goes below zero, and the
curvature of the demo's 8 epoch means, falling 99.7%, read as 57% noise per point and hid both its fall
and its slow-down).

The noise. The series' point-to-point scatter, from its second differences in log space:
``noise = mean(|log y[i-1] - 2 log y[i] + log y[i+1]|) / (sqrt(6) sqrt(2 / pi))`` over the finite positive
values seen so far (for independent noise of relative size s a second difference is normal with standard
deviation ``sqrt(6) s``, and ``sqrt(2 / pi)`` is the mean of a standard normal's absolute value). A smooth
curve's second differences are its curvature, and a spike adds its size: both only raise the estimate and
make the tests stricter. The mean rather than the median: with the few points of a short run the median's
scatter let pure noise pass the phase test in 3-5% of runs (benchmarks/phase_rule_noise.py).
``relative_noise`` is the same statistic on relative linear second differences, for a series that is not
positive.

The phase-boundary test. The improvement rate is the least-squares slope of log y over the last
``window`` checks (``improvement_rate``: 0.02 means the fitted exponential falls about 2% per check); its
standard error is ``noise / sqrt(window (window^2 - 1) / 12)``. A boundary needs the rate under the phase's
fraction of the peak rate so far, and:

- at least ``window`` checks since the previous boundary, so every phase has a window of its own;
- the ending phase's fastest rate above ``EVIDENCE_Z`` standard errors (its improvement was real): for the
  first phase the run's peak, for a later one the fastest window lying wholly inside it;
- the fall from that rate to the current one above ``EVIDENCE_Z * sqrt(2)`` standard errors (the slow-down
  is real).

``EVIDENCE_Z`` is 5: the peak is the largest of many overlapping windows and the noise is estimated from the
same points, so pure noise passes the 4 standard errors of a single comparison in about 1-3% of runs, 5 in
under 1% (measured from 8 to 400 points, benchmarks/phase_rule_noise.py). A window holding a value that is
not finite or not positive has no log slope and is not judged.

The trend test (``describe_trend``): the series fell or rose when the log of the ratio of the medians of its
first and last tenth exceeds ``EVIDENCE_Z`` standard errors of that difference (a median of k points has a
standard error of about 1.25 noise / sqrt(k)); otherwise it stayed flat within its noise, or it is too short
to tell. Without a boundary the report describes the series by this test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from phi2tutor.errors import Phi2TutorError

PHASE_NAMES = ("rapid learning", "fine-tuning", "stabilization")
"""Phase names in order; a phase's index (the TensorBoard scalar ``phase/index``) indexes this tuple."""

MODES = ("min", "max")

# Calibrated on the reference run (tests/reference_run.py): with the log-space rate they put its boundaries
# at epochs 50 and 101, where the hand-written analysis put them at 50 and 100 (fine_tuning_below 0.26-0.275
# gives 50; stabilization_below 0.046-0.047 gives 101, 0.048 gives 100, 0.049 gives 99).
DEFAULT_PHASE_WINDOW = 15
DEFAULT_FINE_TUNING_BELOW = 0.27
DEFAULT_STABILIZATION_BELOW = 0.047

EVIDENCE_Z = 5.0
"""Standard errors a change must exceed before the trend test or the phase rule names it (the module
docstring has both tests): 5 keeps pure noise from making phases in more than 1% of runs."""

RATE_SPACE = "log"
"""What PhaseTracker's rates measure (saved in its state_dict): the slope of log value per check. A state
saved without it holds a linear-rate peak, which is recomputed from the saved values."""

MIN_TREND_POINTS = 5
"""Fewer logged points than this and ``describe_trend`` says only that there are too few to tell."""


@dataclass(frozen=True)
class Phase:
    """One phase of a run, with the reference analysis's numbers.

    Attributes:
        index: 0 rapid learning, 1 fine-tuning, 2 stabilization.
        name: ``PHASE_NAMES[index]``.
        first_epoch: first epoch of the phase (the first step, for a series checked by step).
        last_epoch: last epoch (or step) of the phase.
        start_loss: the loss the phase starts from. For the first phase, the run's first loss; for a later
            one, the last loss of the phase before (the reference analysis's convention), so that the
            phases' reductions add up to the run's.
        end_loss: the loss at ``last_epoch``.
        improvement_pct: relative improvement within the phase, ``(start_loss - end_loss) / start_loss``
            in percent: the reference analysis's "Mejora" (96.04%, 37.78%, 11.49%).
        share_of_total_reduction_pct: the phase's part of the whole run's loss reduction,
            ``(start_loss - end_loss) / (run start loss - run end loss)`` in percent; the phases' shares add
            up to 100. The reference analysis calls its phase-1 96.04% "the share of the total improvement",
            but that number is ``improvement_pct``; the share is 98.18%.
    """

    index: int
    name: str
    first_epoch: int
    last_epoch: int
    start_loss: float
    end_loss: float
    improvement_pct: float
    share_of_total_reduction_pct: float


@dataclass(frozen=True)
class PhaseAnalysis:
    """Phases of a whole series (or of the part seen so far).

    Attributes:
        boundaries: last epoch (or step) of every phase but the last, in order; empty for a single phase.
        phases: one ``Phase`` per segment, in order (at most three). When the last boundary is the
            series' last point (a phase began after the last check), that phase has no point yet and no
            entry here, so ``phases`` is one shorter than usual.
        start_loss: the series' first value.
        end_loss: the series' last value.
        total_improvement_pct: ``(start_loss - end_loss) / start_loss`` in percent (97.82% in the
            reference run).
        unit: ``"epoch"`` or ``"step"``: what the positions in ``boundaries`` and the phases count.
        mode: ``"min"`` (a loss: lower is better) or ``"max"``.
    """

    boundaries: tuple[int, ...]
    phases: tuple[Phase, ...]
    start_loss: float
    end_loss: float
    total_improvement_pct: float
    unit: str = "epoch"
    mode: str = "min"


@dataclass(frozen=True)
class PhaseTransition:
    """The moment a new phase begins, as PhaseTracker sees it.

    Attributes:
        phase_index: index of the phase that begins.
        phase_name: its name.
        boundary: last epoch (or step) of the phase that ended; the new phase starts at the next check.
        loss_at_boundary: the loss at ``boundary``: the new phase's ``start_loss``.
        improvement_rate: the improvement rate at ``boundary``: the log-space slope per check (see
            ``improvement_rate``; ``rate_pct`` turns it into percent per check).
        peak_improvement_rate: the fastest improvement rate seen up to ``boundary``.
        threshold: the fraction of the peak the rate fell below.
        rate_standard_error: the standard error of one window's rate at ``boundary`` (from the noise seen
            so far, see the module docstring): the fall from the ending phase's fastest rate exceeded
            ``EVIDENCE_Z * sqrt(2)`` of these.
        phase_peak_improvement_rate: the fastest rate of a window lying wholly in the phase that ended (for
            the first phase, ``peak_improvement_rate``): it exceeded ``EVIDENCE_Z`` standard errors.
    """

    phase_index: int
    phase_name: str
    boundary: int
    loss_at_boundary: float
    improvement_rate: float
    peak_improvement_rate: float
    threshold: float
    rate_standard_error: float | None = None
    phase_peak_improvement_rate: float | None = None


def relative_improvement(values: Sequence[float], window: int, mode: str = "min") -> float | None:
    """Relative improvement of a series over its last ``window`` points, or None with fewer points.

    The least-squares line through the last ``window`` points, from its first point to its last, relative
    to its first: ``(fit_first - fit_last) / |fit_first|`` for ``mode="min"`` (a falling loss gives a
    positive number), the opposite sign for ``mode="max"``. The fitted line, rather than the two raw
    endpoints, keeps one noisy epoch from deciding the answer. NaN when a point in the window is not
    finite; ±inf when the fitted first point is 0 and the line moves.
    """
    _check_mode(mode)
    _check_window_value(window)
    if len(values) < window:
        return None
    tail = np.asarray(values[len(values) - window :], dtype=np.float64)
    if not np.all(np.isfinite(tail)):
        return math.nan
    centered_x = np.arange(window, dtype=np.float64) - (window - 1) / 2
    slope = float(centered_x @ (tail - tail.mean())) / float(centered_x @ centered_x)
    fit_change = slope * (window - 1)
    fit_first = float(tail.mean()) - fit_change / 2
    gain = -fit_change if mode == "min" else fit_change
    if fit_first == 0.0:
        return 0.0 if gain == 0.0 else math.copysign(math.inf, gain)
    return gain / abs(fit_first)


def improvement_rate(values: Sequence[float], window: int, mode: str = "min") -> float | None:
    """Improvement per check over the last ``window`` points, in log space: the least-squares slope of
    ``log(value)`` (minus it for ``mode="min"``, so a falling loss gives a positive rate).

    0.02 means the fitted exponential falls (``mode="max"``: rises) about 2% per check; ``rate_pct`` gives
    the exact percentage. None with fewer than ``window`` points; NaN when a point of the window is not
    finite or not positive (it has no logarithm).
    """
    _check_mode(mode)
    _check_window_value(window)
    if len(values) < window:
        return None
    tail = np.asarray(values[len(values) - window :], dtype=np.float64)
    if not np.all(np.isfinite(tail)) or np.any(tail <= 0):
        return math.nan
    logs = np.log(tail)
    centered_x = np.arange(window, dtype=np.float64) - (window - 1) / 2
    slope = float(centered_x @ (logs - logs.mean())) / float(centered_x @ centered_x)
    return -slope if mode == "min" else slope


def rate_pct(rate: float, mode: str = "min") -> float:
    """An ``improvement_rate`` as the percent change per check of its fitted exponential: how much a loss
    falls (``mode="min"``) or a metric rises (``mode="max"``) per check."""
    return 100 * (1 - math.exp(-rate)) if mode == "min" else 100 * (math.exp(rate) - 1)


def improvement_rates(values: Sequence[float], window: int, mode: str = "min") -> list[float]:
    """``improvement_rate`` at every point of the series, NaN where fewer than ``window`` points exist."""
    rates = [math.nan] * min(len(values), window - 1)
    for end in range(window, len(values) + 1):
        rates.append(improvement_rate(values[end - window : end], window, mode))
    return rates


def is_plateau(values: Sequence[float], window: int, min_rel_improvement: float, mode: str = "min") -> bool:
    """Whether the series improved by less than ``min_rel_improvement`` over its last ``window`` points.

    False with fewer than ``window`` points (not enough history to tell) or a non-finite point in the
    window. ``min_rel_improvement=0.01`` with ``window=10`` on an epoch series: under 1% over 10 epochs.
    """
    improvement = relative_improvement(values, window, mode)
    return improvement is not None and not math.isnan(improvement) and improvement < min_rel_improvement


_MEAN_ABS_SECOND_DIFFERENCE = math.sqrt(6) * math.sqrt(2 / math.pi)
"""Mean |second difference| of independent noise of standard deviation 1 (module docstring)."""


def relative_noise(values: Sequence[float]) -> float:
    """The series' relative point-to-point noise from its second differences, each relative to its middle
    point (module docstring), for a series that is not positive.

    Non-finite points and points at 0 are skipped; 0.0 when no three consecutive usable points exist.
    """
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 3:
        return 0.0
    before, middle, after = array[:-2], array[1:-1], array[2:]
    usable = np.isfinite(before) & np.isfinite(middle) & np.isfinite(after) & (middle != 0)
    if not np.any(usable):
        return 0.0
    second = np.abs(before[usable] - 2 * middle[usable] + after[usable]) / np.abs(middle[usable])
    return float(np.mean(second)) / _MEAN_ABS_SECOND_DIFFERENCE


def log_noise(values: Sequence[float]) -> float:
    """The series' noise in log space (module docstring): for small scatter the relative size of its
    point-to-point noise, but a near-exponential fall's curvature does not count as noise. Points that are
    not finite or not positive are left out; 0.0 with fewer than three left."""
    logs = np.log(np.asarray([v for v in values if math.isfinite(v) and v > 0], dtype=np.float64))
    if len(logs) < 3:
        return 0.0
    second = np.abs(logs[:-2] - 2 * logs[1:-1] + logs[2:])
    return float(np.mean(second)) / _MEAN_ABS_SECOND_DIFFERENCE


def rate_standard_error(noise: float, window: int) -> float:
    """Standard error of a window's relative improvement rate for a series of relative noise ``noise``."""
    return noise / math.sqrt(window * (window * window - 1) / 12)


@dataclass(frozen=True)
class Trend:
    """What a whole series did, judged against its own noise (``describe_trend``).

    Attributes:
        kind: ``"fell"``, ``"rose"``, ``"flat"`` (the head and tail medians differ by less than
            ``EVIDENCE_Z`` standard errors) or ``"too_few_points"`` (under ``MIN_TREND_POINTS``).
        points: finite points the judgement used.
        head: median of the first ``edge_points`` finite points (None when too few).
        tail: median of the last ``edge_points`` finite points: the smoothed final value.
        edge_points: points in each median: a tenth of the series, at least 1.
        noise: relative noise of the series: ``log_noise`` for a positive series, else ``relative_noise``.
        change_pct: ``(head - tail) / |head|`` in percent (positive: fell).
        standard_error_pct: standard error of the change, in percent (of the head's log for a positive
            series: for small changes the same as percent of the head).
        standard_errors: the change in standard errors, the number the verdict compares with ``EVIDENCE_Z``
            (on a positive series the log change ``log(head / tail)``; positive: fell).
        from_first: the change is measured from the first point instead of the head median: the head and
            tail medians were within the noise, but the first point stood beyond it (a loss that fell
            within the first tenth of the run, then stayed). ``first`` is that point, and ``change_pct``,
            ``standard_error_pct`` and ``standard_errors`` refer to it.
        first: the first finite point.
    """

    kind: str
    points: int
    head: float | None
    tail: float | None
    edge_points: int
    noise: float
    change_pct: float | None
    standard_error_pct: float | None
    standard_errors: float | None = None
    from_first: bool = False
    first: float | None = None


def edge_points(count: int) -> int:
    """Points in the head and tail medians of a series of ``count`` points: a tenth, at least one."""
    return max(1, math.ceil(count / 10))


def describe_trend(values: Sequence[float]) -> Trend:
    """Whether a loss fell, rose or stayed flat within its noise, from the medians of its first and last
    tenth: the change counts when it exceeds ``EVIDENCE_Z`` standard errors (a median of k points has a
    standard error of about 1.25 noise / sqrt(k)). When the medians agree within the noise, the first point
    is compared with the tail median too (standard error ``noise * sqrt(1 + 1.25**2 / k)``): a fall within
    the first tenth is a fall, not "flat"."""
    finite = [float(v) for v in values if math.isfinite(v)]
    count = edge_points(len(finite))
    # A loss falls multiplicatively (near-exponentially): on a positive series the change and the scatter
    # are judged in log space, where a smooth decay has little curvature. In linear terms the curvature of a
    # short, fast fall (1.17, 0.11, 0.02, ... over 8 epochs) reads as 57% noise and hides a 99.7% fall.
    positive = bool(finite) and min(finite) > 0
    noise = log_noise(finite) if positive else relative_noise(finite)
    if len(finite) < MIN_TREND_POINTS:
        return Trend(
            "too_few_points", len(finite), None, finite[-1] if finite else None, count, noise, None, None
        )
    head = float(np.median(finite[:count]))
    tail = float(np.median(finite[-count:]))
    first = finite[0]
    if head == 0.0:
        kind = "flat" if tail == 0.0 else "rose"
        return Trend(kind, len(finite), head, tail, count, noise, None, None, first=first)
    change = (head - tail) / abs(head)
    judged = math.log(head / tail) if positive else change
    error = 1.25 * noise * math.sqrt(2 / count)
    kind = _verdict(judged, error)
    if kind == "flat" and count > 1 and first != 0.0:
        first_change = (first - tail) / abs(first)
        first_judged = math.log(first / tail) if positive else first_change
        first_error = noise * math.sqrt(1 + 1.25**2 / count)
        if _verdict(first_judged, first_error) != "flat":
            z = first_judged / first_error if first_error else None
            return Trend(
                _verdict(first_judged, first_error), len(finite), head, tail, count, noise,
                100 * first_change, 100 * first_error, z, from_first=True, first=first,
            )  # fmt: skip
    z = judged / error if error else None
    return Trend(kind, len(finite), head, tail, count, noise, 100 * change, 100 * error, z, first=first)


def _verdict(judged: float, error: float) -> str:
    if judged > EVIDENCE_Z * error:
        return "fell"
    if -judged > EVIDENCE_Z * error:
        return "rose"
    return "flat"


class PhaseTracker:
    """The phase rule, applied causally one check at a time; ``detect_phases`` runs it on a whole series.

    Rule. At each check the tracker computes the improvement rate over the trailing ``window`` checks
    (``improvement_rate``: the least-squares slope of the log value per check) and keeps the fastest
    rate seen so far, the peak. The run starts in "rapid learning"; "fine-tuning" begins after the first
    check whose rate is below ``fine_tuning_below`` x peak, and "stabilization" after the first later check
    whose rate is below ``stabilization_below`` x peak. Phases only move forward, at most one per check,
    and the check that crosses the threshold is the last one of the phase that ends (its boundary). No
    boundary comes before ``window`` checks exist, none while the peak is not positive (a series that
    never improved stays in its first phase), and none without the evidence test of the module docstring:
    the peak and its fall must stand ``EVIDENCE_Z`` standard errors above the noise of the values seen.

    Why relative to the peak rather than absolute rates: the ratio does not change with how often the
    series is checked (every epoch, every 50 steps) nor with how fast a particular run learns, and a slow
    start (learning-rate warmup) raises the peak later instead of ending the first phase early.

    A boundary at check t depends only on the values up to t, so the online callback, which sees one
    value per check, and the training report, which sees the whole series, find the same boundaries.

    Args:
        window: checks the improvement rate is measured over (at least 2). Longer windows smooth noise
            and delay boundaries by about half a window.
        fine_tuning_below: fine-tuning begins when the rate falls below this fraction of the peak (0-1).
        stabilization_below: stabilization begins when the rate falls below this fraction of the peak;
            smaller than ``fine_tuning_below``.
        mode: ``"min"`` for a loss (lower is better), ``"max"`` for a metric that rises. Rates are taken in
            log space, so the metric must be positive: a window holding a value at or below 0 is not judged.
        owner: the name error messages give for these options (the callback that passes them).
    """

    def __init__(
        self,
        window: int = DEFAULT_PHASE_WINDOW,
        fine_tuning_below: float = DEFAULT_FINE_TUNING_BELOW,
        stabilization_below: float = DEFAULT_STABILIZATION_BELOW,
        mode: str = "min",
        owner: str = "PhaseTracker",
    ) -> None:
        validate_phase_options(window, fine_tuning_below, stabilization_below, mode, owner)
        self.window = window
        self.fine_tuning_below = fine_tuning_below
        self.stabilization_below = stabilization_below
        self.mode = mode
        self.positions: list[int] = []
        self.values: list[float] = []
        self.boundaries: list[int] = []
        self.transitions: list[PhaseTransition] = []
        self.peak_improvement_rate: float | None = None
        self.phase_peak_improvement_rate: float | None = None

    @property
    def phase_index(self) -> int:
        """Index of the phase the next check belongs to."""
        return len(self.boundaries)

    @property
    def phase_name(self) -> str:
        return PHASE_NAMES[self.phase_index]

    evidence_z = EVIDENCE_Z
    """Standard errors the peak rate and its fall must exceed (module docstring)."""

    def rate_of(self, values: Sequence[float]) -> float | None:
        """The improvement rate at the last of ``values`` (``improvement_rate``); a subclass may measure it
        otherwise (benchmarks/phase_rule_noise.py compares the linear rule this one replaced)."""
        return improvement_rate(values, self.window, self.mode)

    def noise_of(self, values: Sequence[float]) -> float:
        """The noise the evidence test compares the rates with (``log_noise``)."""
        return log_noise(values)

    def evidence_peak(self) -> float | None:
        """The rate the evidence test measures the slow-down from: the ending phase's fastest window."""
        return self.phase_peak_improvement_rate

    def update(self, position: int, value: float) -> PhaseTransition | None:
        """Take the value checked at ``position`` (an epoch or a step, increasing); return a transition
        if a new phase begins after this check."""
        if self.positions and position <= self.positions[-1]:
            raise ValueError(
                f"positions must increase: got {position} after {self.positions[-1]}. Give each check its "
                "own epoch or step."
            )
        self.positions.append(int(position))
        self.values.append(float(value))
        rate = self.rate_of(self.values)
        if rate is None or not math.isfinite(rate):
            return None
        if self.peak_improvement_rate is None or rate > self.peak_improvement_rate:
            self.peak_improvement_rate = rate
        inside = self._checks_since_boundary() >= self.window  # the window lies wholly in this phase
        if inside and (self.phase_peak_improvement_rate is None or rate > self.phase_peak_improvement_rate):
            self.phase_peak_improvement_rate = rate
        if self.phase_index == len(PHASE_NAMES) - 1 or self.peak_improvement_rate <= 0:
            return None
        if not inside:  # every phase gets a window of its own
            return None
        threshold = (self.fine_tuning_below, self.stabilization_below)[self.phase_index]
        if rate >= threshold * self.peak_improvement_rate:
            return None
        # The ending phase must have improved, and slowed down, beyond the noise: the first phase by its
        # peak (the run's), a later one by the fastest window of its own. Judged against the run's peak
        # alone, any noisy stretch after a fast start would pass as a further slow-down.
        phase_peak = self.evidence_peak()
        standard_error = rate_standard_error(self.noise_of(self.values), self.window)
        if not (
            phase_peak > self.evidence_z * standard_error
            and phase_peak - rate > self.evidence_z * math.sqrt(2) * standard_error
        ):
            return None
        transition = PhaseTransition(
            phase_index=self.phase_index + 1,
            phase_name=PHASE_NAMES[self.phase_index + 1],
            boundary=int(position),
            loss_at_boundary=float(value),
            improvement_rate=rate,
            peak_improvement_rate=self.peak_improvement_rate,
            threshold=threshold,
            rate_standard_error=standard_error,
            phase_peak_improvement_rate=phase_peak,
        )
        self.boundaries.append(int(position))
        self.transitions.append(transition)
        self.phase_peak_improvement_rate = None  # the new phase has no window of its own yet
        return transition

    def _checks_since_boundary(self) -> int:
        """Checks since the last boundary (all checks but one before the first): a window of this phase
        alone exists once this reaches ``window``."""
        if not self.boundaries:
            return len(self.positions)
        return len(self.positions) - 1 - self.positions.index(self.boundaries[-1])

    def _recompute_peaks(self) -> None:
        """The run's and the current phase's fastest rates, from the saved values and boundaries."""
        self.peak_improvement_rate = self.phase_peak_improvement_rate = None
        start = self.positions.index(self.boundaries[-1]) + 1 if self.boundaries else 0
        for end in range(self.window, len(self.values) + 1):
            rate = self.rate_of(self.values[:end])
            if rate is None or not math.isfinite(rate):
                continue
            self.peak_improvement_rate = max(rate, self.peak_improvement_rate or rate)
            if end - self.window >= start:
                self.phase_peak_improvement_rate = max(rate, self.phase_peak_improvement_rate or rate)

    def phase_index_of(self, position: int) -> int:
        """Index of the phase a checked position belongs to, by the boundaries found so far."""
        return phase_index_of(position, self.boundaries)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a restart, as plain Python data (checkpoint-friendly)."""
        return {
            "positions": list(self.positions),
            "values": list(self.values),
            "boundaries": list(self.boundaries),
            "transitions": [asdict(transition) for transition in self.transitions],
            "peak_improvement_rate": self.peak_improvement_rate,
            "phase_peak_improvement_rate": self.phase_peak_improvement_rate,
            "rate_space": RATE_SPACE,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Restored as saved rather than replayed, so a resumed run keeps its phase even if the thresholds
        # were changed for the rest of the run.
        self.positions = [int(p) for p in state["positions"]]
        self.values = [float(v) for v in state["values"]]
        self.boundaries = [int(b) for b in state["boundaries"]]
        self.transitions = [PhaseTransition(**t) for t in state["transitions"]]
        self.peak_improvement_rate = state["peak_improvement_rate"]
        self.phase_peak_improvement_rate = state.get("phase_peak_improvement_rate")
        if state.get("rate_space") != RATE_SPACE or "phase_peak_improvement_rate" not in state:
            # Saved by the linear-rate rule: its peak is in other units than the rates to come, and it kept
            # no phase peak. Both are functions of the saved values: recompute them; the boundaries stay.
            self._recompute_peaks()

    def analysis(self, unit: str = "epoch") -> PhaseAnalysis:
        """The phases of the values checked so far (``summarize_phases`` on the found boundaries)."""
        if not self.values:
            raise ValueError("no value has been checked yet")
        return summarize_phases(self.values, self.boundaries, self.positions, mode=self.mode, unit=unit)


def detect_phases(
    values: Sequence[float],
    positions: Sequence[int] | None = None,
    *,
    window: int = DEFAULT_PHASE_WINDOW,
    fine_tuning_below: float = DEFAULT_FINE_TUNING_BELOW,
    stabilization_below: float = DEFAULT_STABILIZATION_BELOW,
    mode: str = "min",
    unit: str = "epoch",
) -> PhaseAnalysis:
    """Split a series (a loss by epoch or by step) into up to three phases by the ``PhaseTracker`` rule.

    Args:
        values: the monitored value at each check, in order.
        positions: the epoch (or step) of each value; 1, 2, 3, ... when omitted.
        window: checks the improvement rate is measured over (PhaseTracker).
        fine_tuning_below: fraction of the peak rate under which fine-tuning begins.
        stabilization_below: fraction of the peak rate under which stabilization begins.
        mode: ``"min"`` for a loss, ``"max"`` for a metric that rises.
        unit: what positions count, ``"epoch"`` or ``"step"``; carried into the result.
    """
    positions = _positions_for(values, positions)
    tracker = PhaseTracker(window, fine_tuning_below, stabilization_below, mode, owner="detect_phases")
    for position, value in zip(positions, values):
        tracker.update(position, value)
    return summarize_phases(values, tracker.boundaries, positions, mode=mode, unit=unit)


def summarize_phases(
    values: Sequence[float],
    boundaries: Sequence[int],
    positions: Sequence[int] | None = None,
    *,
    mode: str = "min",
    unit: str = "epoch",
) -> PhaseAnalysis:
    """The numbers of each phase for given boundaries (found by ``detect_phases`` or chosen by hand).

    Args:
        values: the monitored value at each check, in order.
        boundaries: last epoch (or step) of every phase but the last: increasing positions of the series,
            at most two.
        positions: the epoch (or step) of each value; 1, 2, 3, ... when omitted.
        mode: ``"min"`` for a loss, ``"max"`` for a metric that rises.
        unit: what positions count, ``"epoch"`` or ``"step"``.
    """
    _check_mode(mode)
    positions = _positions_for(values, positions)
    if not values:
        raise ValueError("the series is empty: there is nothing to split into phases")
    boundaries = [int(b) for b in boundaries]
    if len(boundaries) > len(PHASE_NAMES) - 1:
        raise ValueError(f"at most {len(PHASE_NAMES) - 1} boundaries (three phases), got {boundaries}")
    if any(later <= earlier for earlier, later in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must increase, got {boundaries}")
    index_of_position = {position: index for index, position in enumerate(positions)}
    for boundary in boundaries:
        if boundary not in index_of_position:
            raise ValueError(
                f"boundary {boundary} must be one of the series' {unit}s {positions[0]}..{positions[-1]}"
            )
    values = [float(v) for v in values]
    run_start, run_end = values[0], values[-1]
    last_indices = [index_of_position[b] for b in boundaries]
    # A boundary at the last point means the next phase has begun but has no point yet: no Phase for it.
    if not last_indices or last_indices[-1] != len(values) - 1:
        last_indices.append(len(values) - 1)
    phases = []
    first_index = 0
    for index, last_index in enumerate(last_indices):
        start = run_start if index == 0 else values[first_index - 1]
        end = values[last_index]
        phases.append(
            Phase(
                index=index,
                name=PHASE_NAMES[index],
                first_epoch=positions[first_index],
                last_epoch=positions[last_index],
                start_loss=start,
                end_loss=end,
                improvement_pct=_relative_gain_pct(start, end, mode),
                share_of_total_reduction_pct=_share_pct(start - end, run_start - run_end),
            )
        )
        first_index = last_index + 1
    return PhaseAnalysis(
        boundaries=tuple(boundaries),
        phases=tuple(phases),
        start_loss=run_start,
        end_loss=run_end,
        total_improvement_pct=_relative_gain_pct(run_start, run_end, mode),
        unit=unit,
        mode=mode,
    )


def phase_index_of(position: int, boundaries: Sequence[int]) -> int:
    """Index of the phase a position belongs to: the number of boundaries before it."""
    return sum(1 for boundary in boundaries if position > boundary)


def validate_phase_options(
    window: int, fine_tuning_below: float, stabilization_below: float, mode: str, owner: str
) -> None:
    """Raise Phi2TutorError, naming the option and its valid range, for a bad phase-rule option."""
    validate_window(window, owner, "checks the improvement rate is measured over")
    validate_mode(mode, owner)
    for option, value in (
        ("fine_tuning_below", fine_tuning_below),
        ("stabilization_below", stabilization_below),
    ):
        if not _is_real(value) or not 0.0 < value < 1.0:
            raise Phi2TutorError(
                f"{owner}: {option}={value!r} is out of range. It is the fraction of the fastest improvement "
                "rate seen so far under which the next phase begins, a number strictly between 0 and 1 "
                f"(defaults: fine_tuning_below={DEFAULT_FINE_TUNING_BELOW}, "
                f"stabilization_below={DEFAULT_STABILIZATION_BELOW})."
            )
    if stabilization_below >= fine_tuning_below:
        raise Phi2TutorError(
            f"{owner}: stabilization_below={stabilization_below} must be smaller than "
            f"fine_tuning_below={fine_tuning_below}: stabilization is the slower phase, so it begins when "
            "the improvement rate falls further below its peak than it did for fine-tuning."
        )


def validate_window(window: int, owner: str, what: str) -> None:
    """Raise Phi2TutorError unless ``window`` is an integer of at least 2."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise Phi2TutorError(
            f"{owner}: window={window!r} is out of range. It is the number of {what}; a trend needs at "
            "least two points, so give an integer >= 2 (for example 10)."
        )


def validate_mode(mode: str, owner: str) -> None:
    """Raise Phi2TutorError unless ``mode`` is "min" or "max"."""
    if mode not in MODES:
        raise Phi2TutorError(
            f"{owner}: mode={mode!r} is not valid. Use 'min' for a metric that should fall (a loss) or 'max' "
            "for one that should rise (an accuracy)."
        )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_window_value(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")


def _positions_for(values: Sequence[float], positions: Sequence[int] | None) -> list[int]:
    if positions is None:
        return list(range(1, len(values) + 1))
    positions = [int(p) for p in positions]
    if len(positions) != len(values):
        raise ValueError(f"{len(values)} values but {len(positions)} positions")
    if any(later <= earlier for earlier, later in zip(positions, positions[1:])):
        raise ValueError("positions must increase")
    return positions


def _relative_gain_pct(start: float, end: float, mode: str) -> float:
    gain = start - end if mode == "min" else end - start
    if start == 0.0:
        return 0.0 if gain == 0.0 else math.nan
    return 100.0 * gain / abs(start)


def _share_pct(part: float, whole: float) -> float:
    return math.nan if whole == 0.0 else 100.0 * part / whole


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
