"""The report's numbers: pure functions from a run's records (records.py) to report.json's content, one per
section. No Lightning import, no wording: text.py turns these numbers into sentences, figures.py into PNGs.

Every number is a logged value, or an observed change between two named logged points, or a rule's
verdict with the rule's own numbers beside it (ReportSettings and phi2tutor.phases's evidence test).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from phi2tutor.errors import Phi2TutorError, first_line
from phi2tutor.keys import CONFIG_YAML, LOSS_EPOCH_KEY, VAL_LOSS_KEY
from phi2tutor.phases import (
    DEFAULT_FINE_TUNING_BELOW,
    DEFAULT_PHASE_WINDOW,
    DEFAULT_STABILIZATION_BELOW,
    EVIDENCE_Z,
    describe_trend,
    detect_phases,
    edge_points,
    summarize_phases,
)
from phi2tutor.report.records import (
    PHI2TUTOR_RUN,
    Point,
    RunRecords,
    config_value,
    epoch_index,
    is_number,
)
from phi2tutor.schedule import SHORTENING_OUTCOMES

REPORT_SCHEMA_VERSION = 2

MIN_LENGTH_WINDOW = 3
"""The smallest phase window the report chooses by a series' length (a rate needs three points to be more
than a difference of two)."""

MIN_SETTLED_TAIL = 3
"""Grad-norm values the tail needs before the report says whether the grad norm settled."""

PHASE_NAME_KEYS = ("rapid_learning", "fine_tuning", "stabilization")

# A report covers only part of a run when it ended this way: its numbers stop at the last logged step.
PARTIAL_STOPS = ("checkpoint", "ended_before_max_steps", "interrupted", "failed")


@dataclass(frozen=True)
class ReportSettings:
    """The report's own rules of judgement. They are written into report.json, so every statement of the
    report can be traced to data and to the rule that turned the data into words.

    Attributes:
        remaining_reduction_pct: suggest a shorter run ending near the first epoch after which the loss
            fell by less than this share of the run's total reduction.
        min_epochs_saved_pct: ... but only when that saves at least this share of the epochs run.
        overfitting_rise_pct: the validation loss overfits when, after its best, it rises by more than this
            (relative, %) while the training loss falls.
        grad_norm_tail_pct: the grad norm's settled level is the median of this last share of its values.
        grad_norm_settle_factor: it has settled from the first epoch after which every epoch's median grad
            norm stays under this multiple of the settled level.
        accuracy_trend_evaluations: answer-accuracy evaluations the end-of-run trend looks at.
        accuracy_flat_points: the accuracy is flat when those evaluations lie within this many percentage
            points.
        memory_tight_pct: a peak above this share of the memory budget is called tight.
        max_micro_batch_searched: the largest micro-batch the memory planner is asked about.
        chance_tolerance_pct: a flat loss within this (relative, %) of ln(k), k = 2..10, is named as the loss
            of a k-way classifier at chance.
    """

    remaining_reduction_pct: float = 1.0
    min_epochs_saved_pct: float = 20.0
    overfitting_rise_pct: float = 5.0
    grad_norm_tail_pct: float = 25.0
    grad_norm_settle_factor: float = 1.5
    accuracy_trend_evaluations: int = 3
    accuracy_flat_points: float = 2.0
    memory_tight_pct: float = 90.0
    max_micro_batch_searched: int = 256
    chance_tolerance_pct: float = 1.0


def build_report(
    records: RunRecords,
    *,
    phase_boundaries: Sequence[int] | None = None,
    settings: ReportSettings | None = None,
) -> dict[str, Any]:
    """Every number of the report, computed from ``records``: the content of report.json (strict JSON:
    a missing or non-finite number is null, and the ``nonfinite`` section says where NaN or inf appeared).

    Args:
        records: what the run left (``load_records``).
        phase_boundaries: last epochs (or steps) of the first phases, to summarize instead of detecting them
            (the reference analysis put them at epochs 50 and 100).
        settings: the report's rules of judgement; defaults otherwise.
    """
    settings = settings or ReportSettings()
    logged_loss = bool(records.train_losses or records.epoch_losses)
    # A phi2tutor run that stopped before its first logged step (out of memory in the first step) still gets
    # the short report of what its run.json and memory.json hold; a run without them has nothing to report.
    if not logged_loss and not (records.source_kind == PHI2TUTOR_RUN and records.run_info.get("stop")):
        raise Phi2TutorError(
            f"{records.source} logs no training loss ({LOSS_EPOCH_KEY} or train/loss): the run ended before "
            "it logged one, so there is nothing to report yet. Report again once a loss has been logged."
        )
    notes: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "source": records.source,
        "source_kind": records.source_kind,
        "run_name": records.run_name,
        "generated_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "settings": asdict(settings),
        "evidence_z": EVIDENCE_Z,
    }
    report["stop"] = stop_section(records)
    report["coverage"] = coverage_section(records, report["stop"])
    report["loss"] = loss_section(records) if logged_loss else None
    report["general"] = general_section(records, report["loss"])
    report["memory"] = memory_section(records, settings, notes)
    report["phases"] = phases_section(records, phase_boundaries, settings, notes) if logged_loss else None
    report["nonfinite"] = nonfinite_section(records)
    report["grad_norm"] = grad_norm_section(records, settings, notes)
    report["learning_rate"] = learning_rate_section(records, notes)
    report["validation"] = validation_section(records, settings, notes)
    report["recommendations"] = recommendations(records, report, settings)
    report["notes"] = notes
    report["figures"] = {}
    return report


# ------------------------------------------------------------------------------------------------ series
def analysed_series(records: RunRecords) -> tuple[str, list[int], list[float]]:
    """The loss series the phases and the trend are judged on: (unit, positions, values).

    phi2tutor runs with two or more epochs: the epoch mean (``train/loss_epoch``, what PhaseDetection
    follows). Trainer runs whose every logged loss sits at a whole epoch: those points, by epoch. Otherwise
    (fractional epochs, a single epoch, max_steps): every logged loss, by optimizer step.
    """
    if records.source_kind == PHI2TUTOR_RUN and len(records.epoch_losses) >= 2:
        return "epoch", [e for e, _ in records.epoch_losses], [v for _, v in records.epoch_losses]
    points = records.train_losses
    if not points:
        return "epoch", [e for e, _ in records.epoch_losses], [v for _, v in records.epoch_losses]
    epochs = [p.epoch for p in points]
    whole = all(abs(e - round(e)) < 1e-6 for e in epochs)
    if records.source_kind != PHI2TUTOR_RUN and whole and len(set(round(e) for e in epochs)) == len(epochs):
        return "epoch", [int(round(e)) for e in epochs], [p.value for p in points]
    by_step: dict[int, float] = {}
    for point in points:
        by_step[point.step] = point.value  # a step logged twice keeps its last value
    return "step", list(by_step), list(by_step.values())


def phase_series(records: RunRecords) -> tuple[str, list[int], list[float], str]:
    """The series the phases are judged on: (unit, positions, values, series kind).

    What the run's PhaseDetection checked ("checked", from run.json) when it checked something other than
    the epoch mean loss, e.g. train/loss at every optimizer step: the logged points are a subsample of it
    (every log_every_n_steps), and the same rule on another series would find other boundaries. Otherwise
    the analysed series (``analysed_series``).
    """
    checks = records.phase_checks
    if checks is not None and (checks.unit == "step" or checks.monitor != LOSS_EPOCH_KEY):
        return checks.unit, checks.positions, checks.values, "checked"
    unit, positions, values = analysed_series(records)
    return (
        unit,
        positions,
        values,
        "epoch_mean" if records.source_kind == PHI2TUTOR_RUN and unit == "epoch" else "logged",
    )


def _named(point: Point | None) -> dict[str, Any] | None:
    if point is None:
        return None
    return {"value": loss_number(point.value), "step": point.step, "epoch": round(point.epoch, 2)}


def loss_section(records: RunRecords) -> dict[str, Any]:
    """First and last logged training loss, the smoothed final loss, the reductions between them, the
    trend against the noise, epoch means (two or more complete epochs) and a partial last epoch."""
    points = records.train_losses
    if not points:  # a phi2tutor run that logged only epoch means
        points = [Point(0, float(e), v) for e, v in records.epoch_losses]
    finite = [p for p in points if math.isfinite(p.value)]
    first, last = points[0], points[-1]
    last_finite = finite[-1] if finite else None
    count = edge_points(len(finite))
    tail = finite[-count:]
    smoothed = statistics.median(p.value for p in tail) if tail else None
    trend = describe_trend([p.value for p in points])
    complete = records.epoch_losses
    epochs_run = records.epochs_run
    partial = None
    if epochs_run is not None and epochs_run - math.floor(epochs_run + 1e-6) > 1e-6:
        number = math.floor(epochs_run) + 1
        in_partial = [p for p in points if epoch_index(p.epoch) == number]
        partial = {
            "epoch": number,
            "fraction": round(epochs_run - math.floor(epochs_run), 2),
            "points": len(in_partial),
        }
    positive = [p.value for p in finite if p.value > 0]
    points_in: dict[int, int] = {}  # a Trainer run's epoch mean is the mean of its logged points: how many
    if records.source_kind != PHI2TUTOR_RUN:
        for point in records.train_losses:
            points_in[epoch_index(point.epoch)] = points_in.get(epoch_index(point.epoch), 0) + 1
    return {
        "points": len(points),
        "nonfinite_points": len(points) - len(finite),
        "first": _named(first),
        "last": _named(last),
        "last_finite": _named(last_finite) if last_finite is not last else None,
        "smoothed_final": {
            "value": loss_number(smoothed),
            "points": len(tail),
            "first_step": tail[0].step if tail else None,
            "last_step": tail[-1].step if tail else None,
            "rule": "median",
        }
        if tail
        else None,
        "reduction_pct": pct_change(first.value, (last_finite or last).value),
        "smoothed_reduction_pct": pct_change(first.value, smoothed) if smoothed is not None else None,
        "mean": loss_number(statistics.fmean(p.value for p in finite)) if finite else None,
        "trend": {
            "kind": trend.kind,
            # The change was measured from the first logged loss, the head median being within the noise.
            "from_first": trend.from_first,
            "first": loss_number(trend.first),
            "head": loss_number(trend.head),
            "tail": loss_number(trend.tail),
            "edge_points": trend.edge_points,
            "noise_pct": r2(100 * trend.noise),
            "change_pct": r2(trend.change_pct),
            "standard_error_pct": r2(trend.standard_error_pct),
            "standard_errors": round(trend.standard_errors, 1) if trend.standard_errors is not None else None,
            # Its size, for sentences that already say the direction.
            "standard_errors_abs": abs(round(trend.standard_errors, 1))
            if trend.standard_errors is not None
            else None,
        },
        "epoch_means": [
            {"epoch": e, "loss": loss_number(v), "points": points_in.get(e) if points_in else None}
            for e, v in complete
        ]
        if len(complete) >= 2
        else None,
        "complete_epochs": len(complete),
        "partial_epoch": partial,
        "span_ratio": r2(max(positive) / min(positive)) if positive else None,
    }


# ----------------------------------------------------------------------------------------------- general
def general_section(records: RunRecords, loss: dict[str, Any] | None) -> dict[str, Any]:
    info = records.run_info
    total, trainable = info.get("total_parameters"), info.get("trainable_parameters")
    duration = info.get("duration_seconds")
    max_epochs = info.get("max_epochs", config_value(records.config, "trainer", "max_epochs"))
    return {
        "base_model": info.get("base_model"),
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_pct": round_sig(100 * trainable / total, 3) if total and trainable is not None else None,
        "hardware": info.get("hardware"),
        "precision": info.get("precision"),
        "quantization": info.get("quantization"),
        "epochs_run": plain(round(records.epochs_run, 2)) if records.epochs_run is not None else None,
        "complete_epochs": loss["complete_epochs"] if loss else len(records.epoch_losses),
        "max_epochs": plain(max_epochs),
        "optimizer_steps": info.get("global_step"),
        "max_steps": info.get("max_steps") if (info.get("max_steps") or 0) > 0 else None,
        "started_at": info.get("started_at"),
        "ended_at": info.get("ended_at"),
        "duration_seconds": round(duration, 2) if duration is not None else None,
        "duration_minutes": round(duration / 60, 2) if duration is not None else None,
        "duration_parts": duration_parts(duration) if duration is not None else None,
        # The callback's one-line summary reads these two.
        "final_loss": loss["last"]["value"] if loss else None,
        "mean_loss": loss["mean"] if loss else None,
        "trainer_reported_mean_loss": loss_number(records.trainer_reported_mean_loss),
    }


# -------------------------------------------------------------------------------------------------- stop
def stop_section(records: RunRecords) -> dict[str, Any]:
    """Why the run stopped: run.json's reason (phi2tutor) or the state's (Trainer, records.py)."""
    stop = records.run_info.get("stop")
    if isinstance(stop, dict) and stop.get("reason"):
        # Stated as the report states numbers: an epoch to 2 decimals, a metric to 4 significant digits.
        rounding = {"epoch": lambda v: round(v, 2), "best_metric": sig4}
        return {
            key: plain(rounding.get(key, lambda v: v)(value)) if isinstance(value, float) else value
            for key, value in stop.items()
        }
    max_epochs = config_value(records.config, "trainer", "max_epochs")
    if is_number(max_epochs) and (records.epochs_run or 0) >= max_epochs:
        return {"reason": "max_epochs", "epoch": max_epochs}
    return {"reason": "unknown"}


def coverage_section(records: RunRecords, stop: dict[str, Any]) -> dict[str, Any]:
    """Whether the report covers the whole run or the run up to a step (a checkpoint, an interruption), and,
    for a phi2tutor run that stopped before its first epoch was complete, how far into it the run got."""
    last = records.train_losses[-1] if records.train_losses else None
    info = records.run_info
    before_first_epoch = (
        records.source_kind == PHI2TUTOR_RUN and not records.epoch_losses and (records.epochs_run or 0) < 1
    )
    return {
        "partial": stop.get("reason") in PARTIAL_STOPS,
        "up_to_step": stop.get("step") if stop.get("step") is not None else (last.step if last else None),
        "up_to_epoch": plain(round(records.epochs_run, 2)) if records.epochs_run is not None else None,
        "max_steps": stop.get("max_steps"),
        "before_first_epoch": before_first_epoch,
        # Optimizer steps completed (run.json's global_step) of the first epoch's steps, losses logged.
        "optimizer_steps": info.get("global_step") if before_first_epoch else None,
        "steps_per_epoch": info.get("steps_per_epoch") if before_first_epoch else None,
        "losses_logged": len(records.train_losses) if before_first_epoch else None,
    }


# ------------------------------------------------------------------------------------------------ phases
def phases_section(
    records: RunRecords, boundaries: Sequence[int] | None, settings: ReportSettings, notes: list
) -> dict[str, Any]:
    """The learning phases by the PhaseDetection rule (phi2tutor.phases), or at given boundaries; without
    evidence of phases, the verdict says what the loss did instead."""
    unit, positions, values, series = phase_series(records)
    options = {
        "window": length_window(len(values)),
        "fine_tuning_below": DEFAULT_FINE_TUNING_BELOW,
        "stabilization_below": DEFAULT_STABILIZATION_BELOW,
        **(records.phase_options or {}),
    }
    # The run's own PhaseDetection window when it had one (the boundaries found online are then the
    # report's); otherwise one sized to the series, so a short run is not judged by a 15-point window.
    window_from = "run" if "window" in (records.phase_options or {}) else "length"
    if boundaries is not None:
        try:
            analysis = summarize_phases(values, [int(b) for b in boundaries], positions, unit=unit)
        except ValueError as error:
            raise Phi2TutorError(
                f"Phase boundaries {list(boundaries)} do not fit this run ({error}). Give at most two "
                f"increasing {unit}s between {positions[0]} and {positions[-1]}."
            ) from None
        method = "given"
    else:
        # The same rule, options and series as the PhaseDetection callback: one source of truth.
        analysis = detect_phases(values, positions, unit=unit, **options)
        method = "detected"
        if len(values) < options["window"]:
            notes.append(
                {
                    "key": "too_few_points_for_phases",
                    "points": len(values),
                    "window": options["window"],
                    "unit": unit,
                }
            )
    trend = describe_trend(values)
    has_phases = method == "given" or bool(analysis.boundaries)
    total = analysis.start_loss - analysis.end_loss
    phases = []
    if has_phases:
        index_of = {position: index for index, position in enumerate(positions)}
        for phase in analysis.phases:
            count = index_of[phase.last_epoch] - index_of[phase.first_epoch] + 1
            share = phase.share_of_total_reduction_pct
            phases.append(
                {
                    "number": phase.index + 1,
                    "name": PHASE_NAME_KEYS[phase.index],
                    "first": phase.first_epoch,
                    "last": phase.last_epoch,
                    "points": count,
                    "points_share_pct": r2(100 * count / len(values)),
                    "start_loss": loss_number(phase.start_loss),
                    "end_loss": loss_number(phase.end_loss),
                    "improvement_pct": r2(phase.improvement_pct),
                    # A share is a part of a fall: only when the run fell and this phase fell within it.
                    "share_of_total_reduction_pct": r2(share)
                    if total > 0 and math.isfinite(share) and 0.0 <= share <= 100.0
                    else None,
                    # A detected last phase with fewer points than the window has begun, but the run ended
                    # before it could be described (its numbers are two or three noisy points).
                    "just_begun": method == "detected"
                    and phase.index == len(analysis.phases) - 1
                    and phase.index > 0
                    and count < options["window"],
                }
            )
    next_phase = (
        PHASE_NAME_KEYS[len(phases)] if has_phases and len(analysis.boundaries) == len(phases) else None
    )
    if has_phases:
        verdict = "phases"
    elif trend.kind == "fell":
        verdict = "fell_steadily"
    else:
        verdict = trend.kind  # "flat", "rose" or "too_few_points"
    result = {
        "method": method,
        "unit": unit,
        "verdict": verdict,
        "series": series,
        "monitor": records.phase_checks.monitor if series == "checked" else None,
        "check_every_n_steps": records.phase_checks.every_n_steps if series == "checked" else None,
        "points": len(values),
        "began_after_last": next_phase,
        "options": options if method == "detected" else None,
        "window_from": window_from if method == "detected" else None,
        "length_window_bounds": [MIN_LENGTH_WINDOW, DEFAULT_PHASE_WINDOW],
        "boundaries": list(analysis.boundaries),
        "online_boundaries": records.online_phase_boundaries,
        "first_position": positions[0],
        "last_position": positions[-1],
        "start_loss": loss_number(analysis.start_loss),
        "end_loss": loss_number(analysis.end_loss),
        "total_reduction_pct": r2(analysis.total_improvement_pct),
        "flat_level": loss_number(trend.tail) if verdict == "flat" else None,
        "chance_classes": None,
        "phases": phases,
    }
    if verdict == "flat" and trend.tail:
        result["chance_classes"] = chance_classes(trend.tail, settings.chance_tolerance_pct)
    if (
        method == "detected"
        and records.online_phase_boundaries is not None
        and list(analysis.boundaries) != records.online_phase_boundaries
    ):
        notes.append(
            {
                "key": "online_phases_differ",
                "online": records.online_phase_boundaries,
                "offline": list(analysis.boundaries),
            }
        )
    return result


def length_window(points: int) -> int:
    """The phase window for a series with no PhaseDetection options of its own: a tenth of its points,
    between ``MIN_LENGTH_WINDOW`` and ``DEFAULT_PHASE_WINDOW``."""
    return max(MIN_LENGTH_WINDOW, min(DEFAULT_PHASE_WINDOW, points // 10))


def chance_classes(loss: float, tolerance_pct: float) -> int | None:
    """k when ``loss`` is within ``tolerance_pct`` of ln(k) for k in 2..10: a k-way classifier at chance."""
    for classes in range(2, 11):
        if abs(loss - math.log(classes)) <= tolerance_pct / 100 * math.log(classes):
            return classes
    return None


# --------------------------------------------------------------------------------------------- nonfinite
def nonfinite_section(records: RunRecords) -> dict[str, Any] | None:
    """Where NaN or inf first appeared in the training loss, the grad norm and the validation loss."""
    found = {}
    for name, points in (
        ("loss", records.train_losses),
        ("grad_norm", records.grad_norms),
        ("val_loss", records.val_losses),
    ):
        bad = [p for p in points if not math.isfinite(p.value)]
        if bad:
            found[name] = {
                "first_step": bad[0].step,
                "first_epoch": round(bad[0].epoch, 2),
                "count": len(bad),
                "of": len(points),
                "kind": "nan" if math.isnan(bad[0].value) else "inf",
            }
    if not found:
        return None
    first = min(found.values(), key=lambda entry: entry["first_step"])
    return {"series": found, "first_step": first["first_step"], "first_epoch": first["first_epoch"]}


# --------------------------------------------------------------------------------------------- grad norm
def grad_norm_section(records: RunRecords, settings: ReportSettings, notes: list) -> dict[str, Any] | None:
    points = [p for p in records.grad_norms if math.isfinite(p.value)]
    if not points:
        if not records.grad_norms:
            notes.append({"key": "no_grad_norm"})
        return None
    peak = max(points, key=lambda point: point.value)
    values = [p.value for p in points]
    tail = values[-max(1, round(len(values) * settings.grad_norm_tail_pct / 100)) :]
    level = statistics.median(tail)
    by_epoch: dict[int, list[float]] = {}
    for point in points:
        by_epoch.setdefault(epoch_index(point.epoch), []).append(point.value)
    settled_from = None
    # A level needs a few values to be one: with fewer in the tail (a run that logged 3 grad norms) the
    # last value would be its own "settled level".
    judged = len(by_epoch) >= 2 and len(tail) >= MIN_SETTLED_TAIL
    if judged:
        for epoch in sorted(by_epoch, reverse=True):
            if statistics.median(by_epoch[epoch]) > settings.grad_norm_settle_factor * level:
                break
            settled_from = epoch
    return {
        "peak": r4(peak.value),
        "peak_epoch": epoch_index(peak.epoch),
        "peak_step": peak.step,
        "settled_level": r4(level),
        "settled_from_epoch": settled_from,
        "epochs": len(by_epoch),
        "settling_judged": judged,
        "tail_pct": settings.grad_norm_tail_pct,
        "settle_factor": settings.grad_norm_settle_factor,
        "last": r4(values[-1]),
        "last_step": points[-1].step,
        "values_logged": len(values),
    }


# ----------------------------------------------------------------------------------------- learning rate
def learning_rate_section(records: RunRecords, notes: list) -> dict[str, Any] | None:
    points = [p for p in records.learning_rates if math.isfinite(p.value)]
    if not points:
        notes.append({"key": "no_learning_rate"})
        return None
    values = [p.value for p in points]
    steps = [p.step for p in points]
    peak_index = max(range(len(values)), key=values.__getitem__)
    peak = values[peak_index]
    rises = peak_index > 0 and values[0] < 0.9 * peak
    decays = values[-1] < 0.9 * peak
    decay_kind = _decay_kind(steps[peak_index:], values[peak_index:]) if decays else None
    if len(values) < 3:
        shape = "too_few"  # one or two values say nothing about a schedule
    elif rises and steps[peak_index] == steps[-1]:  # (a step's value is logged once per micro-batch)
        shape = (
            "warmup_rising"  # the highest value is the last: what the schedule did next is not in the records
        )
    elif rises and decays:
        shape = f"warmup_{decay_kind}"
    elif rises:
        shape = "warmup_constant"
    elif decays:
        shape = decay_kind
    else:
        shape = "constant"
    span = steps[-1] - steps[0]
    return {
        "peak": sig4(peak),
        "peak_epoch": epoch_index(points[peak_index].epoch),
        "peak_step": steps[peak_index],
        "first": sig4(values[0]),
        "last": sig4(values[-1]),
        "shape": shape,
        "warmup_pct": r2(100 * (steps[peak_index] - steps[0]) / span) if rises and span else None,
        "last_pct_of_peak": r2(100 * values[-1] / peak) if peak else None,
        "phase_aware": _phase_aware_lr(records, points),
    }


def _phase_aware_lr(records: RunRecords, points: list[Point]) -> dict[str, Any] | None:
    """What PhaseAwareLR did (run.json), with the first logged step at the floor it decayed to."""
    recorded = records.run_info.get("phase_aware_lr")
    if not isinstance(recorded, dict) or recorded.get("outcome") not in SHORTENING_OUTCOMES:
        return None
    per_epoch = records.run_info.get("steps_per_epoch")

    def epochs(steps: Any) -> float | None:
        return (
            round_sig(steps / per_epoch, 3)
            if is_number(steps) and is_number(per_epoch) and per_epoch
            else None
        )

    floor = recorded.get("floor_lr")
    at_floor = None
    if recorded["outcome"] == "shortened" and is_number(floor):
        # Logged values are float32-rounded: "at the floor" within a part in a million.
        at_floor = next(
            (
                p.step
                for p in points
                if p.step >= recorded["shortened_at_step"] and p.value <= floor * (1 + 1e-6)
            ),
            None,
        )
    return {
        "outcome": recorded["outcome"],
        "step": recorded.get("decided_at_step"),
        "step_epochs": epochs(recorded.get("decided_at_step")),
        "start_lr": sig4(recorded["start_lr"]) if is_number(recorded.get("start_lr")) else None,
        "floor_lr": sig4(floor) if is_number(floor) else None,
        "decay_steps": recorded.get("decay_steps"),
        "decay_epochs": epochs(recorded.get("decay_steps")),
        "ends_at_step": recorded.get("ends_at_step"),
        "steps_left_before": recorded.get("steps_left_before"),
        "steps_left_epochs": epochs(recorded.get("steps_left_before")),
        "logged_at_floor_from_step": at_floor,
    }


def _decay_kind(steps: list[int], values: list[float]) -> str:
    """ "cosine" or "linear", whichever curve the decay after the peak follows more closely."""
    if len(values) < 4 or steps[-1] == steps[0] or values[0] == values[-1]:
        return "decay"
    progress = [(step - steps[0]) / (steps[-1] - steps[0]) for step in steps]
    normalized = [(value - values[-1]) / (values[0] - values[-1]) for value in values]
    cosine_error = sum((n - 0.5 * (1 + math.cos(math.pi * p))) ** 2 for p, n in zip(progress, normalized))
    linear_error = sum((n - (1 - p)) ** 2 for p, n in zip(progress, normalized))
    return "cosine" if cosine_error < linear_error else "linear"


# ------------------------------------------------------------------------------------------- validation
def validation_section(records: RunRecords, settings: ReportSettings, notes: list) -> dict[str, Any] | None:
    """Validation loss (best, last, overfitting), answer accuracy, other eval metrics by their names."""
    if not records.val_losses and not records.answer_accuracy and not records.eval_metrics:
        notes.append({"key": "no_validation"})
        return None
    result: dict[str, Any] = {
        "val_loss": val_loss_summary(records, settings) if records.val_losses else None,
        "answer_accuracy": None,
        "other_metrics": [],
    }
    if records.answer_accuracy:
        result["answer_accuracy"] = _answer_accuracy(records.answer_accuracy, settings)
        result["answer_accuracy"]["calculator"] = _calculator(records)
    elif records.source_kind == PHI2TUTOR_RUN:
        notes.append({"key": "no_answer_accuracy"})
    for name, points in sorted(records.eval_metrics.items()):
        if name == "eval_answer_accuracy":
            continue
        finite = [p for p in points if math.isfinite(p.value)]
        if not finite:
            continue
        highest = max(finite, key=lambda p: p.value)
        lowest = min(finite, key=lambda p: p.value)
        result["other_metrics"].append(
            {
                "name": name,
                "evaluations": len(points),
                "first": sig4(finite[0].value),
                "first_step": finite[0].step,
                "last": sig4(finite[-1].value),
                "last_step": finite[-1].step,
                "highest": sig4(highest.value),
                "highest_step": highest.step,
                "lowest": sig4(lowest.value),
                "lowest_step": lowest.step,
            }
        )
    result["metric_groups"] = metric_groups([m["name"] for m in result["other_metrics"]])
    return result


def metric_groups(names: Sequence[str], min_groups: int = 3) -> dict[str, Any] | None:
    """Per-class metrics among ``names``: ``eval_<group>_<measure>`` where at least ``min_groups`` groups
    log the same set of measures (a token classifier's eval_T005_f1, eval_T005_precision, ...). The report
    shows them as one row per group instead of one row per metric; None when there are none."""
    measures_of: dict[str, set[str]] = {}
    for name in names:
        rest = name.removeprefix("eval_")
        if "_" in rest:
            group, measure = rest.rsplit("_", 1)
            measures_of.setdefault(group, set()).add(measure)
    counts: dict[frozenset[str], int] = {}
    for measures in measures_of.values():
        if len(measures) >= 2:
            counts[frozenset(measures)] = counts.get(frozenset(measures), 0) + 1
    if not counts:
        return None
    shared, count = max(counts.items(), key=lambda item: (item[1], len(item[0])))
    if count < min_groups:
        return None
    groups = sorted(group for group, measures in measures_of.items() if measures == shared)
    return {"prefix": "eval_", "group_count": len(groups), "groups": groups, "measures": sorted(shared)}


def val_loss_summary(records: RunRecords, settings: ReportSettings) -> dict[str, Any]:
    """First, best and last validation loss, and overfitting: after its best the validation loss rose by
    more than ``overfitting_rise_pct`` while the training loss fell over the same steps."""
    points = records.val_losses
    finite = [p for p in points if math.isfinite(p.value)]
    key = VAL_LOSS_KEY if records.source_kind == PHI2TUTOR_RUN else "eval_loss"
    summary: dict[str, Any] = {"key": key, "evaluations": len(points), "overfitting": None, "rising": None}
    if not finite:
        return summary
    best = min(finite, key=lambda p: p.value)
    last = finite[-1]
    summary.update(
        {
            "first": loss_number(finite[0].value),
            "first_step": finite[0].step,
            "first_epoch": round(finite[0].epoch, 2),
            "best": loss_number(best.value),
            "best_step": best.step,
            "best_epoch": round(best.epoch, 2),
            "last": loss_number(last.value),
            "last_step": last.step,
            "last_epoch": round(last.epoch, 2),
        }
    )
    change = pct_change(best.value, last.value)
    rise = -change if change is not None else None
    summary["rise_after_best_pct"] = rise if last is not best else 0.0
    if last is best or rise is None or rise <= settings.overfitting_rise_pct:
        return summary
    train_at_best = _train_loss_near(records, best.step)
    train_last = _train_loss_near(records, last.step)
    fell = train_at_best is not None and train_last is not None and train_last < train_at_best
    entry = {
        "from_step": best.step,
        "from_epoch": round(best.epoch, 2),
        "best": loss_number(best.value),
        "last": loss_number(last.value),
        "last_step": last.step,
        "rise_pct": r2(rise),
        "train_at_best": loss_number(train_at_best),
        "train_last": loss_number(train_last),
        "train_fall_pct": r2(pct_change(train_at_best, train_last)) if fell else None,
        # Both are medians of this many logged training losses up to the step (_train_loss_near).
        "train_points": edge_points(len([p for p in records.train_losses if math.isfinite(p.value)])),
        "threshold_pct": settings.overfitting_rise_pct,
        "checkpoint_step": best.step,
        "checkpoint_epoch": epoch_index(best.epoch) if records.source_kind == PHI2TUTOR_RUN else None,
    }
    summary["overfitting" if fell else "rising"] = entry
    return summary


def _train_loss_near(records: RunRecords, step: int) -> float | None:
    """The median of the finite training losses logged in the smoothing window up to ``step``."""
    before = [p.value for p in records.train_losses if p.step <= step and math.isfinite(p.value)]
    if not before:
        return None
    count = edge_points(len([p for p in records.train_losses if math.isfinite(p.value)]))
    return statistics.median(before[-count:])


def _answer_accuracy(points: list[tuple[int, float]], settings: ReportSettings) -> dict[str, Any]:
    percents = [(epoch, 100 * value) for epoch, value in points if math.isfinite(value)]
    best_epoch, best_value = max(percents, key=lambda point: point[1])
    recent = [value for _, value in percents[-settings.accuracy_trend_evaluations :]]
    spread = max(recent) - min(recent)
    if len(percents) == 1:
        trend = "single"
    elif percents[-1][1] >= best_value and percents[-1][1] > percents[-2][1]:
        trend = "rising"
    elif len(recent) == settings.accuracy_trend_evaluations and spread <= settings.accuracy_flat_points:
        trend = "flat"
    elif percents[-1][1] < best_value - settings.accuracy_flat_points:
        trend = "falling"
    else:
        trend = "mixed"
    return {
        "first": r2(percents[0][1]),
        "first_epoch": percents[0][0],
        "best": r2(best_value),
        "best_epoch": best_epoch,
        "last": r2(percents[-1][1]),
        "last_epoch": percents[-1][0],
        "trend": trend,
        "previous_pct": r2(percents[-2][1]) if len(percents) > 1 else None,
        "recent_evaluations": len(recent),
        "recent_spread_points": r2(spread),
        "evaluations": len(percents),
    }


def _calculator(records: RunRecords) -> dict[str, Any] | None:
    """Whether the graded answers were decoded with the calculator (run.json; else on when its counts were
    logged) and what it did at the last evaluation; None when the run does not say."""
    recorded = records.run_info.get("calculator") or {}
    calls = records.calculator_counts.get("calls", [])
    changed = records.calculator_counts.get("changed", [])
    enabled = recorded.get("enabled")
    if enabled is None:
        if not calls:
            return None
        enabled = True  # MathAnswerEval logs the counts only with the calculator on
    return {
        "enabled": bool(enabled),
        "annotated_training_data": recorded.get("annotated_training_data"),
        "last_calls": int(calls[-1][1]) if enabled and calls else None,
        "last_changed": int(changed[-1][1]) if enabled and changed else None,
        "last_epoch": calls[-1][0] if enabled and calls else None,
    }


# ------------------------------------------------------------------------------------------------ memory
def memory_section(records: RunRecords, settings: ReportSettings, notes: list) -> dict[str, Any] | None:
    memory = records.memory
    if memory is None:
        notes.append({"key": "no_memory" if records.source_kind == PHI2TUTOR_RUN else "no_memory_state"})
        return None
    budget = memory.get("budget_mb")
    on_cuda = memory.get("max_allocated_mb") is not None
    names = ("allocated", "reserved", "max_allocated") if on_cuda else ("cpu_rss", "cpu_peak_rss")
    rows = []
    for name in names:
        value = memory.get(f"{name}_mb")
        if value is not None:
            rows.append(
                {
                    "name": name,
                    "mb": round(float(value), 2),
                    "percent_of_budget": round(100 * value / budget, 2) if budget else None,
                }
            )
    peak = memory.get("max_allocated_mb") if on_cuda else memory.get("cpu_peak_rss_mb")
    result = {
        "device": memory.get("device"),
        "on_cuda": on_cuda,
        "budget_mb": budget,
        "rows": rows,
        "peak_mb": round(float(peak), 2) if peak is not None else None,
        "peak_percent_of_budget": round(100 * peak / budget, 2) if peak is not None and budget else None,
        "headroom_mb": round(budget - peak, 2) if peak is not None and budget else None,
        "out_of_memory": bool(memory.get("oom")),
        "out_of_memory_at": _out_of_memory_at(memory) if memory.get("oom") else None,
        "planner": None,
    }
    if on_cuda and budget and records.source_kind == PHI2TUTOR_RUN:
        result["planner"] = _planner_micro_batch(records, budget, settings, notes)
    return result


def _out_of_memory_at(memory: dict[str, Any]) -> dict[str, Any]:
    """Where GPUMemoryProfiler saw the out-of-memory error, the planner's estimate it printed beside it (the
    total, the phase it peaks in and its largest terms) and its ways to fit (phi2tutor.memory.ways_to_fit)."""
    estimate = memory.get("estimate") or {}
    terms = sorted(estimate.get("breakdown") or [], key=lambda term: -term.get("bytes", 0))[:3]
    return {
        "step": memory.get("oom_step", memory.get("global_step")),
        "epoch": memory.get("oom_epoch"),
        "estimated_peak_mb": estimate.get("estimated_peak_mb"),
        "estimated_peak_phase": estimate.get("peak_phase"),
        "largest_terms": [{"name": term["name"], "mb": term["mb"]} for term in terms],
        "ways_to_fit": list(memory.get("ways_to_fit") or []),
    }


def _planner_micro_batch(
    records: RunRecords, budget_mb: float, settings: ReportSettings, notes: list
) -> dict[str, Any] | None:
    """The memory planner's view of the run's config: its estimate and the largest micro-batch that fits."""
    if records.config is None:
        notes.append({"key": "no_config_for_planner"})
        return None
    try:
        from phi2tutor.memory import estimate_settings, max_micro_batch_that_fits, plan_from_config_dict
    except ImportError:  # the planner is optional for the report
        return None
    try:
        estimate = plan_from_config_dict(records.config, source=f"{records.source}/{CONFIG_YAML}")
        largest = max_micro_batch_that_fits(
            estimate.model,
            budget_mb,
            limit=settings.max_micro_batch_searched,
            **estimate_settings(estimate),
        )
    except (Phi2TutorError, ValueError, TypeError, OSError) as error:
        notes.append({"key": "planner_failed", "error": first_line(error, 200)})
        return None
    return {
        "micro_batch": estimate.settings["micro_batch"],
        "max_micro_batch": largest,
        "estimated_peak_mb": round(estimate.estimated_peak_mb, 2),
    }


# ------------------------------------------------------------------------------------- recommendations
def recommendations(records: RunRecords, report: dict[str, Any], settings: ReportSettings) -> list:
    """What the data call for, each with the numbers that call for it; ``tool`` picks the vocabulary."""
    items: list[dict[str, Any]] = []
    tool = "phi2tutor" if records.source_kind == PHI2TUTOR_RUN else "trainer"
    # First: the error that stopped the run.
    memory = report["memory"]
    oom = (memory or {}).get("out_of_memory_at")
    if oom and oom["ways_to_fit"]:
        items.append({"kind": "out_of_memory", "step": oom["step"], "ways_to_fit": oom["ways_to_fit"]})
    nonfinite = report["nonfinite"]
    if nonfinite:
        items.append(
            {
                "kind": "nonfinite",
                "tool": tool,
                "step": nonfinite["first_step"],
                "epoch": nonfinite["first_epoch"],
                "learning_rate": config_value(records.config, "model", "learning_rate"),
                "precision": records.run_info.get("precision"),
            }
        )
    val = (report["validation"] or {}).get("val_loss") or {}
    if val.get("overfitting"):
        o = val["overfitting"]
        items.append(
            {
                "kind": "overfitting",
                "tool": tool,
                **{k: o[k] for k in ("from_step", "from_epoch", "checkpoint_epoch")},
            }
        )
    elif val.get("rising"):
        items.append({"kind": "val_rising", "tool": tool, "from_step": val["rising"]["from_step"]})
    phases = report["phases"] or {}
    stop_reason = report["stop"].get("reason")
    still_running = stop_reason in ("checkpoint", "ended_before_max_steps")
    verdict = phases.get("verdict")
    if verdict == "flat" and not nonfinite:
        items.append({"kind": "no_learning", "tool": tool, "level": phases["flat_level"]})
    cut = _shorter_run(records, report, settings) if not val.get("overfitting") and not nonfinite else None
    if cut:
        items.append({"tool": tool, **cut})
    elif (
        verdict in ("phases", "fell_steadily")
        and not val.get("overfitting")
        and not val.get("rising")
        and not nonfinite
        and not still_running
        and stop_reason not in ("early_stopping", "plateau")
    ):
        late = _late_trend(records)
        if late:
            items.append({"kind": "still_improving", "tool": tool, **late})
    planner = (memory or {}).get("planner")
    if memory and memory.get("on_cuda") and memory.get("peak_percent_of_budget") is not None:
        if planner and planner["max_micro_batch"] > planner["micro_batch"]:
            items.append(
                {
                    "kind": "larger_micro_batch",
                    "peak_percent_of_budget": memory["peak_percent_of_budget"],
                    "headroom_mb": memory["headroom_mb"],
                    "micro_batch": planner["micro_batch"],
                    "max_micro_batch": planner["max_micro_batch"],
                    "budget_mb": memory["budget_mb"],
                }
            )
        elif memory["peak_percent_of_budget"] > settings.memory_tight_pct:
            items.append(
                {
                    "kind": "memory_tight",
                    "tool": tool,
                    "peak_percent_of_budget": memory["peak_percent_of_budget"],
                    "threshold_pct": settings.memory_tight_pct,
                    "headroom_mb": memory["headroom_mb"],
                }
            )
    accuracy = (report["validation"] or {}).get("answer_accuracy")
    if accuracy and accuracy["trend"] in ("rising", "flat", "falling"):
        items.append({"kind": f"accuracy_{accuracy['trend']}", "best_epoch": accuracy["best_epoch"]})
    if records.truncated_examples:
        items.append(
            {
                "kind": "truncated",
                "count": records.truncated_examples,
                "max_length": config_value(records.config, "data", "max_length"),
            }
        )
    return items


def _shorter_run(
    records: RunRecords, report: dict[str, Any], settings: ReportSettings
) -> dict[str, Any] | None:
    """A shorter run on an epoch series: the first epoch after which the loss fell by less than
    ``remaining_reduction_pct`` of the run's total (observed values), when that saves enough epochs."""
    if report["phases"] is None:
        return None
    unit, positions, values = analysed_series(records)
    if unit != "epoch" or len(values) < 3 or report["phases"]["verdict"] not in ("phases", "fell_steadily"):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    total = values[0] - values[-1]
    if total <= 0:
        return None
    for epoch, value in zip(positions, values):
        if value - values[-1] < settings.remaining_reduction_pct / 100 * total:
            run_length = positions[-1] - positions[0] + 1
            saved = positions[-1] - epoch
            if saved < max(1, settings.min_epochs_saved_pct / 100 * run_length):
                return None
            return {
                "kind": "max_epochs",
                "epoch": epoch,
                "loss_at_epoch": loss_number(value),
                "final_loss": loss_number(values[-1]),
                "remaining_reduction_pct": round_sig(100 * (value - values[-1]) / total, 3),
                "threshold_pct": settings.remaining_reduction_pct,
                "epochs_saved": saved,
                "epochs_saved_pct": r2(100 * saved / run_length),
            }
    return None


def _late_trend(records: RunRecords) -> dict[str, Any] | None:
    """Whether the loss still fell, beyond its noise, over the second half of the analysed series."""
    unit, positions, values = analysed_series(records)
    half = len(values) // 2
    if half < 5:
        return None
    trend = describe_trend(values[half:])
    if trend.kind != "fell" or trend.from_first:  # a fall at the start of the half is not "still falling"
        return None
    count = trend.edge_points
    return {
        "unit": unit,
        "from_position": positions[half],
        "to_position": positions[-1],
        "head": loss_number(trend.head),
        "tail": loss_number(trend.tail),
        "edge_points": count,
        "change_pct": r2(trend.change_pct),
    }


# ----------------------------------------------------------------------------------------------- helpers
def duration_parts(seconds: float) -> dict[str, int]:
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if total >= 3600:
        secs = 0  # the reference analysis's precision: days, hours, minutes
    return {"days": days, "hours": hours, "minutes": minutes, "seconds": secs}


def pct_change(start: float | None, end: float | None) -> float | None:
    """``(start - end) / |start|`` in percent, rounded to 2 decimals: positive when the value fell."""
    if start is None or end is None or not math.isfinite(start) or not math.isfinite(end) or start == 0:
        return None
    return r2(100 * (start - end) / abs(start))


def loss_number(value: float | None) -> float | None:
    """A loss as the report states it: 4 decimals, 3 significant digits under 0.01; None if not finite."""
    if value is None or not math.isfinite(value):
        return None
    if value == 0 or abs(value) >= 0.01:
        return round(float(value), 4)
    return round_sig(float(value), 3)


def plain(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def r4(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def r2(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 2)


def round_sig(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def sig4(value: float) -> float | None:
    return round_sig(value, 4) if math.isfinite(value) else None
