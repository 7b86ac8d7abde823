"""The training report: what a run did, in numbers, words and figures, computed from the run's own records.

Reads a phi2tutor run directory (TensorBoard events, run.json, memory.json, config.yaml) or a Hugging Face
Trainer trainer_state.json; writes report.md, report.json (every number report.md states) and PNG figures.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phi2tutor.errors import Phi2TutorError, first_line
from phi2tutor.events import event_files, read_scalars
from phi2tutor.keys import (
    ACCURACY_KEY,
    CONFIG_YAML,
    EPOCH_KEY,
    GRAD_NORM_KEY,
    LOSS_EPOCH_KEY,
    LOSS_STEP_KEY,
    LR_KEY,
    MEMORY_JSON,
    MEMORY_PREFIX,
    PHASE_INDEX_KEY,
    REPORT_JSON,
    REPORT_MD,
    RUN_JSON,
    TRAINER_STATE_JSON,
    TRUNCATED_KEY,
    VAL_LOSS_KEY,
)
from phi2tutor.phases import (
    DEFAULT_FINE_TUNING_BELOW,
    DEFAULT_PHASE_WINDOW,
    DEFAULT_STABILIZATION_BELOW,
    detect_phases,
    relative_improvement,
    summarize_phases,
)
from phi2tutor.report_text import LANGUAGES, TEXT, render_markdown

REPORT_SCHEMA_VERSION = 1

PHASE_NAME_KEYS = ("rapid_learning", "fine_tuning", "stabilization")


@dataclass(frozen=True)
class ReportSettings:
    """The report's own rules of judgement. They are written into report.json, so every statement of the
    report can be traced to data and to the rule that turned the data into words.

    Attributes:
        remaining_reduction_pct: suggest a max_epochs near the first epoch after which the loss fell by
            less than this share of the run's total reduction.
        min_epochs_saved_pct: ... but only when that saves at least this share of the epochs run.
        still_improving_window: epochs over which the end of the run is judged still improving.
        still_improving_pct: the loss is still improving when it fell by more than this (relative, %) over
            that window (the least-squares trend of phi2tutor.phases.relative_improvement).
        grad_norm_tail_pct: the grad norm's settled level is the median of this last share of its values.
        grad_norm_settle_factor: it has settled from the first epoch after which every epoch's median grad
            norm stays under this multiple of the settled level.
        accuracy_trend_evaluations: answer-accuracy evaluations the end-of-run trend looks at.
        accuracy_flat_points: the accuracy is flat when those evaluations lie within this many percentage
            points.
        memory_tight_pct: a peak above this share of the memory budget is called tight.
        max_micro_batch_searched: the largest micro-batch the memory planner is asked about.
    """

    remaining_reduction_pct: float = 1.0
    min_epochs_saved_pct: float = 20.0
    still_improving_window: int = 10
    still_improving_pct: float = 1.0
    grad_norm_tail_pct: float = 25.0
    grad_norm_settle_factor: float = 1.5
    accuracy_trend_evaluations: int = 3
    accuracy_flat_points: float = 2.0
    memory_tight_pct: float = 90.0
    max_micro_batch_searched: int = 256


@dataclass
class RunRecords:
    """What a run left behind, in one shape whatever wrote it.

    Epochs are 1-based. ``position`` is the epoch as a real number (a step of epoch e lies in (e-1, e]),
    the x axis of the figures.
    """

    source: str
    source_kind: str  # "phi2tutor-run" or "trainer_state"
    run_name: str
    epoch_losses: list[tuple[int, float]] = field(default_factory=list)
    step_losses: list[tuple[float, float]] = field(default_factory=list)  # (position, loss)
    grad_norms: list[tuple[int, float, float]] = field(default_factory=list)  # (step, position, value)
    learning_rates: list[tuple[int, float, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    answer_accuracy: list[tuple[int, float]] = field(default_factory=list)  # fraction 0..1
    memory_series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    memory: dict[str, Any] | None = None
    run_info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    truncated_examples: int | None = None
    online_phase_boundaries: list[int] | None = None
    phase_options: dict[str, Any] | None = None
    trainer_reported_mean_loss: float | None = None


# ----------------------------------------------------------------------------------------------- reading
def load_records(path: str | Path) -> RunRecords:
    """The records of a phi2tutor run directory, or of an HF Trainer trainer_state.json (file or folder)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return read_trainer_state(path)
        raise Phi2TutorError(
            f"{path} is neither a run directory nor a trainer_state.json. Give a phi2tutor run directory "
            "(lightning_logs/version_N) or the trainer_state.json of a Hugging Face Trainer run."
        )
    if not path.is_dir():
        raise Phi2TutorError(
            f"{path} does not exist. Give a phi2tutor run directory (lightning_logs/version_N) or a "
            "Hugging Face Trainer trainer_state.json."
        )
    if event_files(path):
        return read_run_directory(path)
    if (path / TRAINER_STATE_JSON).is_file():
        return read_trainer_state(path / TRAINER_STATE_JSON)
    versions = sorted(p.name for p in path.glob("version_*") if p.is_dir())
    hint = f" It holds the runs {', '.join(versions)}: give one of them." if versions else ""
    raise Phi2TutorError(
        f"{path} holds no TensorBoard event files (events.out.tfevents.*) and no trainer_state.json, so "
        f"there is no run to report on.{hint} A phi2tutor run directory is written by `phi2tutor fit` "
        "(lightning_logs/version_N) with a TensorBoardLogger."
    )


class _EpochIndex:
    """Maps logged steps to epochs with the ``epoch`` scalar Lightning writes at every logged step."""

    def __init__(self, epoch_points: list[tuple[int, float]], epoch_end_steps: list[int]) -> None:
        self.steps = [step for step, _ in epoch_points]
        self.epochs = [int(round(value)) + 1 for _, value in epoch_points]
        self.epoch_end_steps = sorted(epoch_end_steps)
        self.bounds: dict[int, tuple[int, int]] = {}
        for step, epoch in zip(self.steps, self.epochs):
            first, last = self.bounds.get(epoch, (step, step))
            self.bounds[epoch] = (min(first, step), max(last, step))

    def epoch_of(self, step: int) -> int:
        if self.steps:
            index = bisect.bisect_right(self.steps, step) - 1
            return self.epochs[max(index, 0)]
        # No epoch scalar: an epoch ends at each train/loss_epoch point.
        return 1 + bisect.bisect_left(self.epoch_end_steps, step)

    def position(self, step: int) -> float:
        epoch = self.epoch_of(step)
        first, last = self.bounds.get(epoch, (step, step))
        return epoch - 1 + (min(max(step, first), last) - first + 1) / (last - first + 1)


def read_run_directory(run_dir: str | Path) -> RunRecords:
    """Records of a phi2tutor run directory: event files, and run.json, memory.json, config.yaml if there."""
    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir)
    loss_epoch = scalars.get(LOSS_EPOCH_KEY, [])
    index = _EpochIndex(scalars.get(EPOCH_KEY, []), [step for step, _ in loss_epoch])
    records = RunRecords(source=str(run_dir), source_kind="phi2tutor-run", run_name=run_dir.name)
    by_epoch: dict[int, float] = {}
    for step, value in loss_epoch:
        by_epoch[index.epoch_of(step)] = float(value)
    records.epoch_losses = sorted(by_epoch.items())
    records.step_losses = [(index.position(step), float(v)) for step, v in scalars.get(LOSS_STEP_KEY, [])]
    records.grad_norms = [
        (step, index.position(step), float(v)) for step, v in scalars.get(GRAD_NORM_KEY, [])
    ]
    lr_key = LR_KEY if LR_KEY in scalars else next((k for k in sorted(scalars) if k.startswith("lr-")), None)
    if lr_key is not None:
        records.learning_rates = [(step, index.position(step), float(v)) for step, v in scalars[lr_key]]
    records.val_losses = [(index.epoch_of(step), float(v)) for step, v in scalars.get(VAL_LOSS_KEY, [])]
    # A value at step 0 graded the untouched base (MathAnswerEval's evaluate_before_training): epoch 0.
    records.answer_accuracy = [
        (0 if step == 0 else index.epoch_of(step), float(v)) for step, v in scalars.get(ACCURACY_KEY, [])
    ]
    records.memory_series = {
        tag: [(step, float(v)) for step, v in points]
        for tag, points in sorted(scalars.items())
        if tag.startswith(MEMORY_PREFIX)
    }
    if scalars.get(TRUNCATED_KEY):
        records.truncated_examples = int(scalars[TRUNCATED_KEY][-1][1])
    records.run_info = _read_json_file(run_dir / RUN_JSON) or {}
    records.memory = _read_json_file(run_dir / MEMORY_JSON)
    records.config = _read_yaml_file(run_dir / CONFIG_YAML)
    detection = records.run_info.get("phase_detection") or _phase_detection_from_config(records.config)
    if detection:
        records.phase_options = {
            key: detection[key]
            for key in ("window", "fine_tuning_below", "stabilization_below")
            if detection.get(key) is not None
        }
        if detection.get("boundaries") is not None:
            records.online_phase_boundaries = [int(b) for b in detection["boundaries"]]
    if records.online_phase_boundaries is None and scalars.get(PHASE_INDEX_KEY):
        records.online_phase_boundaries = _boundaries_from_phase_index(
            [(index.epoch_of(step), int(v)) for step, v in scalars[PHASE_INDEX_KEY]]
        )
    return records


def read_trainer_state(path: str | Path) -> RunRecords:
    """Records of a Hugging Face Trainer run from its trainer_state.json (log_history entries with loss,
    grad_norm, learning_rate and epoch); a memory.json next to it is read too."""
    path = Path(path)
    what_to_do = (
        "Give the trainer_state.json that the Hugging Face Trainer writes into output_dir/checkpoint-N/, "
        "as written."
    )
    try:
        state = json.loads(path.read_text())
    except OSError as error:
        raise Phi2TutorError(f"Cannot read {path}: {error.strerror}. {what_to_do}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = (
            f" (line {error.lineno}, column {error.colno}: {error.msg})" if hasattr(error, "lineno") else ""
        )
        raise Phi2TutorError(f"{path} is not valid JSON{where}. {what_to_do}") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise Phi2TutorError(
            f"{path} has no 'log_history' list, so it is not a Trainer state file (or not a complete one). "
            f"{what_to_do}"
        )
    entries = state["log_history"]
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise Phi2TutorError(f"{path}: log_history entry {number} is not an object. {what_to_do}")
        for key in ("loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "train_loss"):
            if key in entry and not _is_number(entry[key]):
                raise Phi2TutorError(
                    f"{path}: log_history entry {number} has {key}={entry[key]!r}, not a number. {what_to_do}"
                )
    losses = [entry for entry in entries if "loss" in entry and "epoch" in entry]
    if not losses:
        raise Phi2TutorError(
            f"{path} logs no training loss: no log_history entry has both 'loss' and 'epoch'. Train with "
            f"logging_steps small enough to log at least once. {what_to_do}"
        )
    records = RunRecords(
        source=str(path), source_kind="trainer_state", run_name=path.parent.name or path.stem
    )
    grouped: dict[int, list[float]] = {}
    for entry in losses:
        grouped.setdefault(_epoch_index(entry["epoch"]), []).append(float(entry["loss"]))
        records.step_losses.append((float(entry["epoch"]), float(entry["loss"])))
    records.epoch_losses = [(epoch, statistics.fmean(values)) for epoch, values in sorted(grouped.items())]
    for entry in entries:
        step, position = int(entry.get("step", 0)), float(entry.get("epoch", 0.0))
        if _is_finite(entry.get("grad_norm")):
            records.grad_norms.append((step, position, float(entry["grad_norm"])))
        if _is_finite(entry.get("learning_rate")) and "loss" in entry:
            records.learning_rates.append((step, position, float(entry["learning_rate"])))
        if _is_finite(entry.get("eval_loss")):
            records.val_losses.append((_epoch_index(position), float(entry["eval_loss"])))
        accuracy = entry.get("eval_answer_accuracy", entry.get("eval_accuracy"))
        if _is_finite(accuracy):
            records.answer_accuracy.append((_epoch_index(position), float(accuracy)))
        if _is_finite(entry.get("train_loss")):
            records.trainer_reported_mean_loss = float(entry["train_loss"])
        if _is_finite(entry.get("train_runtime")):
            records.run_info["duration_seconds"] = float(entry["train_runtime"])
    epochs_run = state.get("epoch", records.step_losses[-1][0])
    records.run_info.update(
        {
            "epochs_run": epochs_run,
            "max_epochs": state.get("num_train_epochs"),
            "max_steps": state.get("max_steps"),
            "global_step": state.get("global_step"),
            "stop": _trainer_state_stop(state),
        }
    )
    records.memory = _read_json_file(path.parent / MEMORY_JSON)
    return records


def _trainer_state_stop(state: dict[str, Any]) -> dict[str, Any]:
    step, max_steps = state.get("global_step"), state.get("max_steps")
    epoch, max_epochs = state.get("epoch"), state.get("num_train_epochs")
    if _is_number(epoch) and _is_number(max_epochs) and epoch >= max_epochs - 1e-6:
        return {"reason": "max_epochs", "epoch": max_epochs}
    if _is_number(step) and _is_number(max_steps) and max_steps > 0:
        if step >= max_steps:
            return {"reason": "max_steps", "step": max_steps}
        return {"reason": "stopped_early", "step": step, "max_steps": max_steps}
    return {"reason": "unknown"}


def _epoch_index(epoch: float) -> int:
    # The Trainer logs the end of epoch 1 as epoch 1.0 and steps inside it as 0.04, 0.5, ...
    return max(1, math.ceil(float(epoch) - 1e-6))


def _boundaries_from_phase_index(points: list[tuple[int, int]]) -> list[int]:
    boundaries: list[int] = []
    previous_epoch, previous_index = None, 0
    for epoch, phase_index in sorted(points):
        if previous_epoch is not None and phase_index > previous_index:
            boundaries.append(previous_epoch)
        previous_epoch, previous_index = epoch, phase_index
    return boundaries


def _phase_detection_from_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    callbacks = ((config or {}).get("trainer") or {}).get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("PhaseDetection"):
            return dict(callback.get("init_args") or {})
    return None


def _read_json_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Phi2TutorError(
            f"{path} cannot be read as JSON ({error}). It is written by phi2tutor at the end of a run; "
            "restore it or delete it, and the report leaves its section out."
        ) from None
    if not isinstance(content, dict):
        raise Phi2TutorError(f"{path} does not hold a JSON object. Restore it or delete it.")
    return content


def _read_yaml_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # the config only refines the report (max_length, planner); its absence is noted
    return content if isinstance(content, dict) else None


# ---------------------------------------------------------------------------------------------- analysis
def build_report(
    records: RunRecords,
    *,
    phase_boundaries: Sequence[int] | None = None,
    settings: ReportSettings | None = None,
) -> dict[str, Any]:
    """Every number of the report, computed from ``records``: the content of report.json.

    Args:
        records: what the run left (``load_records``).
        phase_boundaries: last epochs of the first phases, to summarize instead of detecting them (the
            reference analysis put them at 50 and 100).
        settings: the report's rules of judgement; defaults otherwise.
    """
    settings = settings or ReportSettings()
    if not records.epoch_losses:
        raise Phi2TutorError(
            f"{records.source} logs no epoch loss ({LOSS_EPOCH_KEY}): the run ended before its first epoch "
            "did, so there is nothing to report yet. Report again once an epoch has finished."
        )
    notes: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "source": records.source,
        "source_kind": records.source_kind,
        "run_name": records.run_name,
        "generated_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "settings": asdict(settings),
    }
    report["general"] = _general(records)
    report["memory"] = _memory(records, settings, notes)
    report["phases"] = _phases(records, phase_boundaries, notes)
    report["grad_norm"] = _grad_norm(records, settings, notes)
    report["learning_rate"] = _learning_rate(records, notes)
    report["validation"] = _validation(records, settings, notes)
    report["stop"] = _stop(records)
    report["recommendations"] = _recommendations(records, report, settings)
    report["notes"] = notes
    report["figures"] = {}
    return report


def _general(records: RunRecords) -> dict[str, Any]:
    info = records.run_info
    losses = [value for _, value in records.epoch_losses]
    total, trainable = info.get("total_parameters"), info.get("trainable_parameters")
    duration = info.get("duration_seconds")
    general = {
        "base_model": info.get("base_model"),
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_pct": _round_sig(100 * trainable / total, 3) if total and trainable is not None else None,
        "hardware": info.get("hardware"),
        "precision": info.get("precision"),
        "quantization": info.get("quantization"),
        "epochs_run": _plain(info.get("epochs_run", len(records.epoch_losses))),
        "max_epochs": _plain(info.get("max_epochs", _config_value(records.config, "trainer", "max_epochs"))),
        "optimizer_steps": info.get("global_step"),
        "started_at": info.get("started_at"),
        "ended_at": info.get("ended_at"),
        "duration_seconds": round(duration, 2) if duration is not None else None,
        "duration_minutes": round(duration / 60, 2) if duration is not None else None,
        "duration_parts": _duration_parts(duration) if duration is not None else None,
        "first_loss": _r4(losses[0]),
        "first_loss_epoch": records.epoch_losses[0][0],
        "final_loss": _r4(losses[-1]),
        "final_loss_epoch": records.epoch_losses[-1][0],
        "mean_loss": _r4(statistics.fmean(losses)),
        "trainer_reported_mean_loss": _r4(records.trainer_reported_mean_loss),
    }
    return general


def _memory(records: RunRecords, settings: ReportSettings, notes: list) -> dict[str, Any] | None:
    memory = records.memory
    if memory is None:
        notes.append({"key": "no_memory"})
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
        "planner": None,
    }
    if on_cuda and budget:
        result["planner"] = _planner_micro_batch(records, budget, settings, notes)
    return result


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


def _phases(records: RunRecords, boundaries: Sequence[int] | None, notes: list) -> dict[str, Any]:
    epochs = [epoch for epoch, _ in records.epoch_losses]
    values = [value for _, value in records.epoch_losses]
    options = {
        "window": DEFAULT_PHASE_WINDOW,
        "fine_tuning_below": DEFAULT_FINE_TUNING_BELOW,
        "stabilization_below": DEFAULT_STABILIZATION_BELOW,
        **(records.phase_options or {}),
    }
    if boundaries is not None:
        try:
            analysis = summarize_phases(values, [int(b) for b in boundaries], epochs)
        except ValueError as error:
            raise Phi2TutorError(
                f"Phase boundaries {list(boundaries)} do not fit this run ({error}). Give at most two "
                f"increasing epochs between {epochs[0]} and {epochs[-1]}."
            ) from None
        method = "given"
    else:
        # The same rule, options and series as the PhaseDetection callback: one source of truth.
        analysis = detect_phases(values, epochs, **options)
        method = "detected"
        if len(values) < options["window"]:
            notes.append(
                {"key": "too_few_epochs_for_phases", "epochs": len(values), "window": options["window"]}
            )
    total_epochs = epochs[-1] - epochs[0] + 1
    phases = [
        {
            "number": phase.index + 1,
            "name": PHASE_NAME_KEYS[phase.index],
            "first_epoch": phase.first_epoch,
            "last_epoch": phase.last_epoch,
            "epochs": phase.last_epoch - phase.first_epoch + 1,
            "epochs_share_pct": round(100 * (phase.last_epoch - phase.first_epoch + 1) / total_epochs, 2),
            "start_loss": _r4(phase.start_loss),
            "end_loss": _r4(phase.end_loss),
            "improvement_pct": _r2(phase.improvement_pct),
            "share_of_total_reduction_pct": _r2(phase.share_of_total_reduction_pct),
        }
        for phase in analysis.phases
    ]
    # A boundary at the last epoch: the next phase has begun but has no epoch of its own yet.
    next_phase = PHASE_NAME_KEYS[len(phases)] if len(analysis.boundaries) == len(phases) else None
    result = {
        "method": method,
        "began_after_last_epoch": next_phase,
        "options": options if method == "detected" else None,
        "boundaries": list(analysis.boundaries),
        "online_boundaries": records.online_phase_boundaries,
        "start_loss": _r4(analysis.start_loss),
        "end_loss": _r4(analysis.end_loss),
        "total_reduction_pct": _r2(analysis.total_improvement_pct),
        "phases": phases,
    }
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


def _grad_norm(records: RunRecords, settings: ReportSettings, notes: list) -> dict[str, Any] | None:
    points = records.grad_norms
    if not points:
        notes.append({"key": "no_grad_norm"})
        return None
    peak_step, peak_position, peak = max(points, key=lambda point: point[2])
    values = [value for _, _, value in points]
    tail = values[-max(1, round(len(values) * settings.grad_norm_tail_pct / 100)) :]
    level = statistics.median(tail)
    by_epoch: dict[int, list[float]] = {}
    for _, position, value in points:
        by_epoch.setdefault(_epoch_index(position), []).append(value)
    settled_from = None
    for epoch in sorted(by_epoch, reverse=True):
        if statistics.median(by_epoch[epoch]) > settings.grad_norm_settle_factor * level:
            break
        settled_from = epoch
    return {
        "peak": _r4(peak),
        "peak_epoch": _epoch_index(peak_position),
        "peak_step": peak_step,
        "settled_level": _r4(level),
        "settled_from_epoch": settled_from,
        "tail_pct": settings.grad_norm_tail_pct,
        "settle_factor": settings.grad_norm_settle_factor,
        "last": _r4(values[-1]),
        "values_logged": len(values),
    }


def _learning_rate(records: RunRecords, notes: list) -> dict[str, Any] | None:
    points = records.learning_rates
    if not points:
        notes.append({"key": "no_learning_rate"})
        return None
    values = [value for _, _, value in points]
    steps = [step for step, _, _ in points]
    peak_index = max(range(len(values)), key=values.__getitem__)
    peak = values[peak_index]
    rises = peak_index > 0 and values[0] < 0.9 * peak
    decays = values[-1] < 0.9 * peak
    decay_kind = None
    if decays:
        decay_kind = _decay_kind(steps[peak_index:], values[peak_index:])
    if rises and decays:
        shape = f"warmup_{decay_kind}"
    elif rises:
        shape = "warmup_constant"
    elif decays:
        shape = decay_kind
    else:
        shape = "constant"
    span = steps[-1] - steps[0]
    return {
        "peak": _sig4(peak),
        "peak_epoch": _epoch_index(points[peak_index][1]),
        "peak_step": steps[peak_index],
        "first": _sig4(values[0]),
        "last": _sig4(values[-1]),
        "shape": shape,
        "warmup_pct": _r2(100 * (steps[peak_index] - steps[0]) / span) if rises and span else None,
        "last_pct_of_peak": _r2(100 * values[-1] / peak) if peak else None,
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


def _validation(records: RunRecords, settings: ReportSettings, notes: list) -> dict[str, Any] | None:
    if not records.val_losses and not records.answer_accuracy:
        notes.append({"key": "no_validation"})
        return None
    result: dict[str, Any] = {"val_loss": None, "answer_accuracy": None}
    if records.val_losses:
        result["val_loss"] = _first_best_last(records.val_losses, best=min, digits=4)
    if records.answer_accuracy:
        percents = [(epoch, 100 * value) for epoch, value in records.answer_accuracy]
        accuracy = _first_best_last(percents, best=max, digits=2)
        recent = [value for _, value in percents[-settings.accuracy_trend_evaluations :]]
        spread = max(recent) - min(recent)
        if len(percents) == 1:
            trend = "single"
        elif percents[-1][1] >= max(v for _, v in percents) and percents[-1][1] > percents[-2][1]:
            trend = "rising"
        elif len(recent) == settings.accuracy_trend_evaluations and spread <= settings.accuracy_flat_points:
            trend = "flat"
        elif percents[-1][1] < max(v for _, v in percents) - settings.accuracy_flat_points:
            trend = "falling"
        else:
            trend = "mixed"
        accuracy.update(
            {
                "trend": trend,
                "previous_pct": _r2(percents[-2][1]) if len(percents) > 1 else None,
                "recent_evaluations": len(recent),
                "recent_spread_points": _r2(spread),
                "evaluations": len(percents),
            }
        )
        result["answer_accuracy"] = accuracy
    else:
        notes.append({"key": "no_answer_accuracy"})
    return result


def _first_best_last(points: list[tuple[int, float]], best, digits: int) -> dict[str, Any]:
    best_epoch, best_value = best(points, key=lambda point: point[1])
    return {
        "first": round(points[0][1], digits),
        "first_epoch": points[0][0],
        "best": round(best_value, digits),
        "best_epoch": best_epoch,
        "last": round(points[-1][1], digits),
        "last_epoch": points[-1][0],
    }


def _stop(records: RunRecords) -> dict[str, Any]:
    stop = records.run_info.get("stop")
    if isinstance(stop, dict) and stop.get("reason"):
        return dict(stop)
    epochs_run = records.run_info.get("epochs_run", len(records.epoch_losses))
    max_epochs = _config_value(records.config, "trainer", "max_epochs")
    if _is_number(max_epochs) and epochs_run >= max_epochs:
        return {"reason": "max_epochs", "epoch": max_epochs}
    return {"reason": "unknown"}


def _recommendations(records: RunRecords, report: dict[str, Any], settings: ReportSettings) -> list:
    recommendations: list[dict[str, Any]] = []
    epochs = [epoch for epoch, _ in records.epoch_losses]
    values = [value for _, value in records.epoch_losses]
    total = values[0] - values[-1]
    cut = None
    if len(values) >= 3 and total > 0:
        for epoch, value in zip(epochs, values):
            if value - values[-1] < settings.remaining_reduction_pct / 100 * total:
                cut = (epoch, 100 * (value - values[-1]) / total)
                break
    run_length = epochs[-1] - epochs[0] + 1
    if cut is not None and (epochs[-1] - cut[0]) >= settings.min_epochs_saved_pct / 100 * run_length:
        recommendations.append(
            {
                "kind": "max_epochs",
                "epoch": cut[0],
                "remaining_reduction_pct": _round_sig(cut[1], 3),
                "threshold_pct": settings.remaining_reduction_pct,
                "epochs_saved": epochs[-1] - cut[0],
                "epochs_saved_pct": _r2(100 * (epochs[-1] - cut[0]) / run_length),
            }
        )
    elif len(values) >= 2:
        window = min(settings.still_improving_window, len(values))
        improvement = relative_improvement(values, window)
        if (
            improvement is not None
            and math.isfinite(improvement)
            and 100 * improvement > settings.still_improving_pct
        ):
            recommendations.append(
                {"kind": "still_improving", "window": window, "improvement_pct": _r2(100 * improvement)}
            )
    memory = report["memory"]
    planner = (memory or {}).get("planner")
    if memory and memory.get("on_cuda") and memory.get("peak_percent_of_budget") is not None:
        if planner and planner["max_micro_batch"] > planner["micro_batch"]:
            recommendations.append(
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
            recommendations.append(
                {
                    "kind": "memory_tight",
                    "peak_percent_of_budget": memory["peak_percent_of_budget"],
                    "threshold_pct": settings.memory_tight_pct,
                    "headroom_mb": memory["headroom_mb"],
                }
            )
    accuracy = (report["validation"] or {}).get("answer_accuracy")
    if accuracy and accuracy["trend"] in ("rising", "flat", "falling"):
        recommendations.append({"kind": f"accuracy_{accuracy['trend']}"})
    if records.truncated_examples:
        recommendations.append(
            {
                "kind": "truncated",
                "count": records.truncated_examples,
                "max_length": _config_value(records.config, "data", "max_length"),
            }
        )
    return recommendations


def write_figures(
    records: RunRecords, report: dict[str, Any], output_dir: Path, language: str
) -> dict[str, str]:
    """Draw the figures whose data were logged; return {figure name: file name} for report.md."""
    from phi2tutor import figures

    written: dict[str, str] = {}
    phases = report["phases"]["phases"]
    names = [TEXT[language][f"phase_{phase['name']}"] for phase in phases]
    epoch_losses = [(float(epoch), value) for epoch, value in records.epoch_losses]
    figures.plot_loss(
        output_dir / figures.FIGURE_FILES["loss"], records.step_losses, epoch_losses, phases, names, language
    )
    written["loss"] = figures.FIGURE_FILES["loss"]
    if records.grad_norms or records.learning_rates:
        figures.plot_grad_norm_and_lr(
            output_dir / figures.FIGURE_FILES["grad_norm_lr"],
            [(position, value) for _, position, value in records.grad_norms],
            [(position, value) for _, position, value in records.learning_rates],
            language,
        )
        written["grad_norm_lr"] = figures.FIGURE_FILES["grad_norm_lr"]
    if records.memory_series:
        budget = (records.memory or {}).get("budget_mb")
        figures.plot_memory(
            output_dir / figures.FIGURE_FILES["memory"], records.memory_series, budget, language
        )
        written["memory"] = figures.FIGURE_FILES["memory"]
    if records.answer_accuracy:
        figures.plot_answer_accuracy(
            output_dir / figures.FIGURE_FILES["answer_accuracy"],
            [(epoch, 100 * value) for epoch, value in records.answer_accuracy],
            language,
        )
        written["answer_accuracy"] = figures.FIGURE_FILES["answer_accuracy"]
    return written


def write_report(
    source: str | Path,
    output_dir: str | Path | None = None,
    *,
    language: str = "en",
    phase_boundaries: Sequence[int] | None = None,
    settings: ReportSettings | None = None,
    draw_figures: bool = True,
) -> dict[str, Any]:
    """Analyse a run and write report.md, report.json and the figures; return report.json's content.

    Args:
        source: a phi2tutor run directory, or an HF Trainer trainer_state.json (or its folder).
        output_dir: where to write; default the run directory (the trainer_state.json's folder).
        language: "en" or "es" for report.md and the figures' labels.
        phase_boundaries: last epochs of the first phases, instead of detecting them.
        settings: the report's rules of judgement.
        draw_figures: write the PNG figures.
    """
    if language not in LANGUAGES:
        raise Phi2TutorError(f"language {language!r} is not available: use one of {', '.join(LANGUAGES)}.")
    records = load_records(source)
    report = build_report(records, phase_boundaries=phase_boundaries, settings=settings)
    report["language"] = language
    source_path = Path(records.source)
    output = (
        Path(output_dir)
        if output_dir is not None
        else (source_path if source_path.is_dir() else source_path.parent)
    )
    output.mkdir(parents=True, exist_ok=True)
    if draw_figures:
        report["figures"] = write_figures(records, report, output, language)
    (output / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (output / REPORT_MD).write_text(render_markdown(report, language))
    return report


def main_report(args: list[str]) -> None:
    """``phi2tutor report RUN_DIR_OR_TRAINER_STATE [--language en|es] [--output DIR] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="phi2tutor report",
        description="Write the training report of a run: report.md, report.json and PNG figures, from the run's "
        "own records (a phi2tutor run directory, or a Hugging Face Trainer trainer_state.json).",
    )
    parser.add_argument("path", help="run directory (lightning_logs/version_N) or trainer_state.json")
    parser.add_argument(
        "--language", choices=LANGUAGES, default="en", help="language of report.md (default en)"
    )
    parser.add_argument("--output", default=None, help="directory to write into (default: the run directory)")
    parser.add_argument("--json", action="store_true", help="also print report.json's content to stdout")
    parser.add_argument(
        "--phase_boundaries",
        "--phase-boundaries",
        type=int,
        nargs="+",
        default=None,
        metavar="EPOCH",
        help="last epochs of the first phases (at most two), instead of detecting them; e.g. 50 100",
    )
    options = parser.parse_args(args)
    report = write_report(
        options.path, options.output, language=options.language, phase_boundaries=options.phase_boundaries
    )
    if options.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        where = Path(options.output) if options.output else Path(report["source"])
        where = where if where.is_dir() else where.parent
        print(
            f"phi2tutor report: wrote {where / REPORT_MD}, {where / REPORT_JSON} and {len(report['figures'])} figures"
        )


# ----------------------------------------------------------------------------------------------- helpers
def _duration_parts(seconds: float) -> dict[str, int]:
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if total >= 3600:
        secs = 0  # the reference analysis's precision: days, hours, minutes
    return {"days": days, "hours": hours, "minutes": minutes, "seconds": secs}


def _config_value(config: dict[str, Any] | None, section: str, key: str) -> Any:
    part = (config or {}).get(section) or {}
    if isinstance(part, dict) and "init_args" in part:
        part = part["init_args"] or {}
    return part.get(key) if isinstance(part, dict) else None


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _r4(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _r2(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 2)


def _round_sig(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def _sig4(value: float) -> float:
    return _round_sig(value, 4)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


NUMBER_PATTERN = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")
"""A number in report text, not one inside a word (phi2tutor, version_0); tests compare report.md to report.json."""
