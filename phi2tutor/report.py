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

from phi2tutor.errors import Phi2TutorError
from phi2tutor.events import event_files, read_scalars
from phi2tutor.phases import (
    DEFAULT_FINE_TUNING_BELOW,
    DEFAULT_PHASE_WINDOW,
    DEFAULT_STABILIZATION_BELOW,
    detect_phases,
    relative_improvement,
    summarize_phases,
)

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
RUN_JSON = "run.json"
MEMORY_JSON = "memory.json"
CONFIG_YAML = "config.yaml"
TRAINER_STATE_JSON = "trainer_state.json"
LANGUAGES = ("en", "es")
REPORT_SCHEMA_VERSION = 1

# TensorBoard keys the report reads (DESIGN.md: keep them stable).
LOSS_STEP_KEY = "train/loss"
LOSS_EPOCH_KEY = "train/loss_epoch"
GRAD_NORM_KEY = "train/grad_norm"
LR_KEY = "train/lr"
VAL_LOSS_KEY = "val/loss"
ACCURACY_KEY = "val/answer_accuracy"
EPOCH_KEY = "epoch"
TRUNCATED_KEY = "data/truncated_examples"
PHASE_INDEX_KEY = "phase/index"
MEMORY_PREFIX = "memory/"

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
        notes.append({"key": "planner_failed", "error": str(error).splitlines()[0][:200]})
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


# --------------------------------------------------------------------------------------------- rendering
TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "Training report: {run}",
        "source": "Written by phi2tutor from the run's own records: `{source}` ({kind}), {generated}.",
        "kind_phi2tutor-run": "phi2tutor run directory",
        "kind_trainer_state": "Hugging Face Trainer state",
        "unknown": "unknown",
        "general": "General information",
        "item": "Item",
        "value": "Value",
        "base_model": "Base model",
        "parameters": "Parameters (counted from the model)",
        "trainable": "Trainable parameters",
        "trainable_value": "{count} ({pct}% of all)",
        "hardware": "Hardware",
        "precision": "Precision",
        "quantization": "Quantization",
        "epochs": "Epochs run",
        "epochs_value": "{run} (max_epochs {max})",
        "steps": "Optimizer steps",
        "started": "Started / ended",
        "duration": "Duration",
        "first_loss": "First loss (epoch {epoch})",
        "final_loss": "Final loss (last epoch, {epoch})",
        "mean_loss": "Mean loss over the run (mean of the epoch losses)",
        "reported_mean_loss": "Mean loss reported by the Trainer (train_loss)",
        "days": "{n} days",
        "day": "{n} day",
        "hours": "{n} hours",
        "hour": "{n} hour",
        "minutes": "{n} minutes",
        "minute": "{n} minute",
        "seconds": "{n} seconds",
        "second": "{n} second",
        "duration_value": "{parts} ({minutes} minutes)",
        "gpu": "{name}, {memory} MB, {sms} multiprocessors",
        "cuda_cores": " ({cores} CUDA cores)",
        "cpu": "CPU: {name}, {cores} cores",
        "memory": "Memory",
        "memory_device": "Device: {device}. Budget: {budget} MB.",
        "memory_kind": "Memory type",
        "memory_size": "Size (MB)",
        "memory_pct": "% of budget",
        "mem_allocated": "Allocated",
        "mem_reserved": "Reserved",
        "mem_max_allocated": "Max allocated",
        "mem_cpu_rss": "Process resident (CPU)",
        "mem_cpu_peak_rss": "Process peak resident (CPU)",
        "memory_peak": "Peak: {peak} MB, {pct}% of the budget; headroom {headroom} MB.",
        "memory_oom": "The run ran out of memory.",
        "memory_planner": "Memory planner for this config: estimated peak {estimate} MB at micro-batch {batch}; "
        "the largest micro-batch it expects to fit the budget is {largest}.",
        "phases": "Learning phases",
        "phases_detected": "Phases detected on the epoch loss by phi2tutor.phases, the rule the PhaseDetection "
        "callback applies during training: window {window} epochs, fine-tuning begins below {ft} and "
        "stabilization below {st} of the fastest improvement rate.",
        "phases_given": "Phase boundaries given: last epochs {boundaries}.",
        "phases_online": "Boundaries found during training by PhaseDetection: {boundaries}.",
        "total_reduction": "Total loss reduction: {pct}% (from {start} at epoch {first} to {end} at epoch {last})",
        "phase_heading": "Phase {number}: {name} (epochs {first}-{last})",
        "phase_began_at_end": "The {name} phase began after the last epoch ({epoch}).",
        "start_loss": "Start loss: {value}",
        "end_loss": "Loss at the end of the phase: {value}",
        "improvement": "Improvement within the phase: {value}% ((start - end) / start)",
        "share": "Share of the total loss reduction: {value}%",
        "phase_epochs": "Epochs: {count} ({pct}% of the run)",
        "phase_rapid_learning": "rapid learning",
        "phase_fine_tuning": "fine-tuning",
        "phase_stabilization": "stabilization",
        "grad_norm": "Gradient norm",
        "grad_peak": "Peak: {peak} at epoch {epoch} (step {step})",
        "grad_settled": "Settled at about {level} (median of the last {tail}% of its values) from epoch {epoch} "
        "on: every later epoch's median stays under {factor} times that level",
        "grad_not_settled": "Not settled: the last epoch's median is above {factor} times the level of the last "
        "{tail}% of its values ({level})",
        "grad_last": "Last value: {value}",
        "lr": "Learning rate",
        "lr_peak": "Peak: {peak} at epoch {epoch} (step {step})",
        "lr_first_last": "First value {first}, last value {last} ({pct}% of the peak)",
        "lr_shape": "Schedule: {shape}",
        "shape_constant": "constant",
        "shape_warmup_constant": "warm-up over the first {warmup}% of the steps, then constant",
        "shape_warmup_cosine": "warm-up over the first {warmup}% of the steps, then cosine decay",
        "shape_warmup_linear": "warm-up over the first {warmup}% of the steps, then linear decay",
        "shape_warmup_decay": "warm-up over the first {warmup}% of the steps, then decay",
        "shape_cosine": "cosine decay from the start",
        "shape_linear": "linear decay from the start",
        "shape_decay": "decay from the start",
        "validation": "Validation",
        "val_loss": "Validation loss: first {first} (epoch {first_epoch}), best {best} (epoch {best_epoch}), "
        "last {last} (epoch {last_epoch})",
        "accuracy": "Answer accuracy (final answers right on held-out problems)",
        "acc_first": "First: {value}% at epoch {epoch}",
        "acc_first_before": "Before training: {value}%",
        "acc_best": "Best: {value}% at epoch {epoch}",
        "acc_last": "Last: {value}% at epoch {epoch}",
        "acc_trend_rising": "Trend: still rising at the end ({previous}% before, {last}% last)",
        "acc_trend_flat": "Trend: flat, the last {n} evaluations lie within {spread} points",
        "acc_trend_falling": "Trend: falling, the last evaluation is below the best",
        "acc_trend_mixed": "Trend: mixed",
        "acc_trend_single": "Trend: one evaluation only",
        "stop": "Why the run stopped",
        "stop_max_epochs": "It reached max_epochs ({epoch}).",
        "stop_max_steps": "It reached max_steps ({step}).",
        "stop_plateau": "PlateauStopping stopped it at epoch {epoch}: the loss had stopped improving.",
        "stop_early_stopping": "Early stopping ({callback}) stopped it at epoch {epoch}.",
        "stop_interrupted": "It was interrupted ({exception}) during epoch {epoch}; this report uses what was "
        "logged until then.",
        "stop_failed": "It failed with {exception} during epoch {epoch}; this report uses what was logged until "
        "then.",
        "stop_stopped": "trainer.should_stop was set (by a callback or the module) at epoch {epoch}.",
        "stop_stopped_early": "It stopped at step {step} of max_steps {max_steps}, before its schedule ended: early "
        "stopping or an interruption (trainer_state.json does not say which).",
        "stop_unknown": "Unknown: the records do not say.",
        "stop_message": "Its message: {message}",
        "figures": "Figures",
        "fig_loss": "Training loss per step and per epoch, with the learning phases shaded.",
        "fig_grad_norm_lr": "Gradient norm (left axis) and learning rate (right axis).",
        "fig_memory": "Memory over the optimizer steps, with the budget line.",
        "fig_answer_accuracy": "Answer accuracy by epoch.",
        "recommendations": "Recommendations",
        "rec_max_epochs": "Train for fewer epochs: after epoch {epoch} the loss fell by only {remaining}% of the "
        "run's total reduction (under {threshold}%), so a max_epochs near {epoch} would have saved "
        "{saved} epochs ({saved_pct}% of the run).",
        "rec_still_improving": "Train for longer: over the last {window} epochs the loss still fell by "
        "{improvement}%.",
        "rec_larger_micro_batch": "Memory headroom: the peak used {pct}% of the {budget} MB budget ({headroom} MB "
        "free). By the memory planner a micro-batch (data.batch_size) of up to {largest} fits, now {batch}: "
        "raise it and lower trainer.accumulate_grad_batches to keep the effective batch, for faster epochs.",
        "rec_memory_tight": "Memory is tight: the peak used {pct}% of the budget (over {threshold}%, {headroom} MB "
        "free). Lower data.batch_size or data.max_length, or turn on gradient checkpointing, before "
        "anything makes a step longer.",
        "rec_accuracy_rising": "Answer accuracy was still rising at the last evaluation: more epochs may still "
        "pay off.",
        "rec_accuracy_flat": "Answer accuracy is flat over the last evaluations: more epochs of the same "
        "training are unlikely to help; change the data, the rank or the learning rate instead.",
        "rec_accuracy_falling": "Answer accuracy fell from its best (epoch {epoch}): keep the checkpoint of that "
        "epoch (ModelCheckpoint on val/answer_accuracy), or stop earlier.",
        "rec_truncated": "{count} training examples were cut at max_length {max_length}: their ends were never "
        "learned. Raise data.max_length or shorten those answers.",
        "no_recommendations": "None: nothing in the records calls for a change.",
        "notes": "Notes",
        "note_no_memory": "No memory.json: the memory section is left out. Add callbacks.memory.GPUMemoryProfiler "
        "to the run to record it.",
        "note_no_config_for_planner": "No config.yaml in the run directory: the memory planner was not asked "
        "about a larger micro-batch.",
        "note_planner_failed": "The memory planner could not read the config: {error}",
        "note_too_few_epochs_for_phases": "Only {epochs} epochs: the phase rule needs {window} before it can end "
        "a phase, so the run is one phase.",
        "note_online_phases_differ": "The boundaries found during training ({online}) differ from the ones found "
        "now ({offline}): the run was resumed or its options changed.",
        "note_no_grad_norm": "No gradient norm was logged: its section is left out.",
        "note_no_learning_rate": "No learning rate was logged: its section is left out (add "
        "LearningRateMonitor).",
        "note_no_validation": "No validation was logged (no val/loss, no answer accuracy): the validation "
        "section is left out.",
        "note_no_answer_accuracy": "No answer accuracy was logged: add callbacks.math_eval.MathAnswerEval to "
        "measure it.",
    },
    "es": {
        "title": "Informe del entrenamiento: {run}",
        "source": "Escrito por phi2tutor a partir de los registros del propio entrenamiento: `{source}` ({kind}), "
        "{generated}.",
        "kind_phi2tutor-run": "directorio de una ejecución de phi2tutor",
        "kind_trainer_state": "estado del Trainer de Hugging Face",
        "unknown": "desconocido",
        "general": "Información general",
        "item": "Característica",
        "value": "Valor",
        "base_model": "Modelo base",
        "parameters": "Parámetros (contados en el modelo)",
        "trainable": "Parámetros entrenables",
        "trainable_value": "{count} ({pct}% del total)",
        "hardware": "Hardware",
        "precision": "Precisión",
        "quantization": "Cuantización",
        "epochs": "Épocas entrenadas",
        "epochs_value": "{run} (max_epochs {max})",
        "steps": "Pasos del optimizador",
        "started": "Inicio / fin",
        "duration": "Duración",
        "first_loss": "Pérdida inicial (época {epoch})",
        "final_loss": "Pérdida final (última época, {epoch})",
        "mean_loss": "Pérdida media del entrenamiento (media de las pérdidas por época)",
        "reported_mean_loss": "Pérdida media según el Trainer (train_loss)",
        "days": "{n} días",
        "day": "{n} día",
        "hours": "{n} horas",
        "hour": "{n} hora",
        "minutes": "{n} minutos",
        "minute": "{n} minuto",
        "seconds": "{n} segundos",
        "second": "{n} segundo",
        "duration_value": "{parts} ({minutes} minutos)",
        "gpu": "{name}, {memory} MB, {sms} multiprocesadores",
        "cuda_cores": " ({cores} núcleos CUDA)",
        "cpu": "CPU: {name}, {cores} núcleos",
        "memory": "Memoria",
        "memory_device": "Dispositivo: {device}. Presupuesto: {budget} MB.",
        "memory_kind": "Tipo de memoria",
        "memory_size": "Tamaño (MB)",
        "memory_pct": "% del presupuesto",
        "mem_allocated": "Asignada",
        "mem_reserved": "Reservada",
        "mem_max_allocated": "Máxima asignada",
        "mem_cpu_rss": "Residente del proceso (CPU)",
        "mem_cpu_peak_rss": "Pico residente del proceso (CPU)",
        "memory_peak": "Pico: {peak} MB, el {pct}% del presupuesto; quedan libres {headroom} MB.",
        "memory_oom": "El entrenamiento se quedó sin memoria.",
        "memory_planner": "Planificador de memoria para esta configuración: pico estimado de {estimate} MB con "
        "micro-lote {batch}; el mayor micro-lote que cabe en el presupuesto según su estimación es {largest}.",
        "phases": "Fases del aprendizaje",
        "phases_detected": "Fases detectadas sobre la pérdida por época con phi2tutor.phases, la misma regla que "
        "aplica el callback PhaseDetection durante el entrenamiento: ventana de {window} épocas; el ajuste "
        "fino empieza por debajo de {ft} y la estabilización por debajo de {st} de la mayor velocidad de "
        "mejora.",
        "phases_given": "Límites de fase indicados: últimas épocas {boundaries}.",
        "phases_online": "Límites hallados durante el entrenamiento por PhaseDetection: {boundaries}.",
        "total_reduction": "Reducción total de la pérdida: {pct}% (de {start} en la época {first} a {end} en la "
        "época {last})",
        "phase_heading": "Fase {number}: {name} (épocas {first}-{last})",
        "phase_began_at_end": "La fase de {name} empezó después de la última época ({epoch}).",
        "start_loss": "Pérdida inicial: {value}",
        "end_loss": "Pérdida al final de la fase: {value}",
        "improvement": "Mejora dentro de la fase: {value}% ((inicial - final) / inicial)",
        "share": "Parte de la reducción total de la pérdida: {value}%",
        "phase_epochs": "Épocas: {count} (el {pct}% del entrenamiento)",
        "phase_rapid_learning": "aprendizaje rápido",
        "phase_fine_tuning": "ajuste fino",
        "phase_stabilization": "estabilización",
        "grad_norm": "Norma del gradiente",
        "grad_peak": "Máximo: {peak} en la época {epoch} (paso {step})",
        "grad_settled": "Se estabilizó en torno a {level} (mediana del último {tail}% de sus valores) desde la "
        "época {epoch}: la mediana de cada época posterior queda por debajo de {factor} veces ese nivel",
        "grad_not_settled": "No se estabilizó: la mediana de la última época supera {factor} veces el nivel del "
        "último {tail}% de sus valores ({level})",
        "grad_last": "Último valor: {value}",
        "lr": "Learning rate (tasa de aprendizaje)",
        "lr_peak": "Máximo: {peak} en la época {epoch} (paso {step})",
        "lr_first_last": "Primer valor {first}, último valor {last} (el {pct}% del máximo)",
        "lr_shape": "Programa: {shape}",
        "shape_constant": "constante",
        "shape_warmup_constant": "calentamiento durante el primer {warmup}% de los pasos y después constante",
        "shape_warmup_cosine": "calentamiento durante el primer {warmup}% de los pasos y después decaimiento "
        "coseno",
        "shape_warmup_linear": "calentamiento durante el primer {warmup}% de los pasos y después decaimiento "
        "lineal",
        "shape_warmup_decay": "calentamiento durante el primer {warmup}% de los pasos y después decaimiento",
        "shape_cosine": "decaimiento coseno desde el principio",
        "shape_linear": "decaimiento lineal desde el principio",
        "shape_decay": "decaimiento desde el principio",
        "validation": "Validación",
        "val_loss": "Pérdida de validación: primera {first} (época {first_epoch}), mejor {best} (época "
        "{best_epoch}), última {last} (época {last_epoch})",
        "accuracy": "Aciertos de la respuesta final (problemas reservados)",
        "acc_first": "Primera evaluación: {value}% en la época {epoch}",
        "acc_first_before": "Antes de entrenar: {value}%",
        "acc_best": "Mejor: {value}% en la época {epoch}",
        "acc_last": "Última: {value}% en la época {epoch}",
        "acc_trend_rising": "Tendencia: todavía al alza al final ({previous}% antes, {last}% en la última)",
        "acc_trend_flat": "Tendencia: estable, las últimas {n} evaluaciones caben en {spread} puntos",
        "acc_trend_falling": "Tendencia: a la baja, la última evaluación queda por debajo de la mejor",
        "acc_trend_mixed": "Tendencia: irregular",
        "acc_trend_single": "Tendencia: solo hay una evaluación",
        "stop": "Por qué terminó el entrenamiento",
        "stop_max_epochs": "Llegó a max_epochs ({epoch}).",
        "stop_max_steps": "Llegó a max_steps ({step}).",
        "stop_plateau": "PlateauStopping lo detuvo en la época {epoch}: la pérdida había dejado de mejorar.",
        "stop_early_stopping": "La parada temprana ({callback}) lo detuvo en la época {epoch}.",
        "stop_interrupted": "Se interrumpió ({exception}) durante la época {epoch}; este informe usa lo "
        "registrado hasta entonces.",
        "stop_failed": "Falló con {exception} durante la época {epoch}; este informe usa lo registrado hasta "
        "entonces.",
        "stop_stopped": "Se activó trainer.should_stop (un callback o el módulo) en la época {epoch}.",
        "stop_stopped_early": "Se detuvo en el paso {step} de max_steps {max_steps}, antes de acabar su programa: "
        "parada temprana o interrupción (trainer_state.json no dice cuál).",
        "stop_unknown": "Desconocido: los registros no lo dicen.",
        "stop_message": "Su mensaje: {message}",
        "figures": "Figuras",
        "fig_loss": "Pérdida de entrenamiento por paso y por época, con las fases del aprendizaje sombreadas.",
        "fig_grad_norm_lr": "Norma del gradiente (eje izquierdo) y learning rate (eje derecho).",
        "fig_memory": "Memoria a lo largo de los pasos del optimizador, con la línea del presupuesto.",
        "fig_answer_accuracy": "Aciertos de la respuesta por época.",
        "recommendations": "Recomendaciones",
        "rec_max_epochs": "Entrenar menos épocas: tras la época {epoch} la pérdida solo bajó un {remaining}% de la "
        "reducción total (menos del {threshold}%), así que un max_epochs cercano a {epoch} habría ahorrado "
        "{saved} épocas (el {saved_pct}% del entrenamiento).",
        "rec_still_improving": "Entrenar más: en las últimas {window} épocas la pérdida aún bajó un "
        "{improvement}%.",
        "rec_larger_micro_batch": "Margen de memoria: el pico usó el {pct}% de los {budget} MB del presupuesto "
        "(quedan {headroom} MB). Según el planificador de memoria cabe un micro-lote (data.batch_size) de hasta "
        "{largest}, ahora {batch}: súbelo y baja trainer.accumulate_grad_batches para conservar el lote "
        "efectivo; las épocas serán más rápidas.",
        "rec_memory_tight": "La memoria va justa: el pico usó el {pct}% del presupuesto (más del {threshold}%, "
        "quedan {headroom} MB). Baja data.batch_size o data.max_length, o activa el gradient checkpointing, "
        "antes de que algo alargue un paso.",
        "rec_accuracy_rising": "Los aciertos seguían subiendo en la última evaluación: más épocas aún pueden "
        "compensar.",
        "rec_accuracy_flat": "Los aciertos no se mueven en las últimas evaluaciones: más épocas del mismo "
        "entrenamiento difícilmente ayudarán; cambia los datos, el rango o el learning rate.",
        "rec_accuracy_falling": "Los aciertos bajaron desde su mejor valor (época {epoch}): conserva el checkpoint "
        "de esa época (ModelCheckpoint sobre val/answer_accuracy) o detén antes el entrenamiento.",
        "rec_truncated": "{count} ejemplos de entrenamiento se cortaron en max_length {max_length}: su final nunca "
        "se aprendió. Sube data.max_length o acorta esas respuestas.",
        "no_recommendations": "Ninguna: nada en los registros pide un cambio.",
        "notes": "Notas",
        "note_no_memory": "No hay memory.json: se omite la sección de memoria. Añade "
        "callbacks.memory.GPUMemoryProfiler al entrenamiento para registrarla.",
        "note_no_config_for_planner": "No hay config.yaml en el directorio: no se consultó al planificador de "
        "memoria sobre un micro-lote mayor.",
        "note_planner_failed": "El planificador de memoria no pudo leer la configuración: {error}",
        "note_too_few_epochs_for_phases": "Solo {epochs} épocas: la regla de fases necesita {window} para cerrar "
        "una fase, así que todo el entrenamiento es una sola fase.",
        "note_online_phases_differ": "Los límites hallados durante el entrenamiento ({online}) no coinciden con "
        "los de ahora ({offline}): se reanudó el entrenamiento o cambiaron sus opciones.",
        "note_no_grad_norm": "No se registró la norma del gradiente: se omite su sección.",
        "note_no_learning_rate": "No se registró el learning rate: se omite su sección (añade "
        "LearningRateMonitor).",
        "note_no_validation": "No se registró validación (ni val/loss ni aciertos): se omite la sección de "
        "validación.",
        "note_no_answer_accuracy": "No se registraron aciertos de la respuesta: añade "
        "callbacks.math_eval.MathAnswerEval para medirlos.",
    },
}


def fmt(value: Any, language: str = "en") -> str:
    """A number exactly as report.json stores it (so the two always agree); "unknown" for None."""
    if value is None:
        return TEXT[language]["unknown"]
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def fmt_count(value: int | None, language: str) -> str:
    """A large integer with thousands grouped: 2,779,683,840 (en), 2 779 683 840 (es)."""
    if value is None:
        return TEXT[language]["unknown"]
    grouped = f"{int(value):,}"
    return grouped if language == "en" else grouped.replace(",", " ")


def render_markdown(report: dict[str, Any], language: str = "en") -> str:
    """report.md's text from report.json's content, in English ("en") or Spanish ("es")."""
    if language not in LANGUAGES:
        raise Phi2TutorError(f"language {language!r} is not available: use one of {', '.join(LANGUAGES)}.")
    t = TEXT[language]

    def f(value: Any) -> str:
        return fmt(value, language)

    lines = [f"# {t['title'].format(run=report['run_name'])}", ""]
    lines += [
        t["source"].format(
            source=report["source"], kind=t[f"kind_{report['source_kind']}"], generated=report["generated_at"]
        ),
        "",
    ]
    lines += _render_general(report["general"], t, f, language)
    if report["memory"] is not None:
        lines += _render_memory(report["memory"], t, f)
    lines += _render_phases(report["phases"], t, f)
    if report["grad_norm"] is not None:
        g = report["grad_norm"]
        lines += [f"## {t['grad_norm']}", ""]
        lines.append(
            "- " + t["grad_peak"].format(peak=f(g["peak"]), epoch=g["peak_epoch"], step=g["peak_step"])
        )
        key = "grad_settled" if g["settled_from_epoch"] is not None else "grad_not_settled"
        lines.append(
            "- "
            + t[key].format(
                level=f(g["settled_level"]),
                tail=f(g["tail_pct"]),
                epoch=g["settled_from_epoch"],
                factor=f(g["settle_factor"]),
            )
        )
        lines += ["- " + t["grad_last"].format(value=f(g["last"])), ""]
    if report["learning_rate"] is not None:
        lr = report["learning_rate"]
        lines += [f"## {t['lr']}", ""]
        lines.append(
            "- " + t["lr_peak"].format(peak=f(lr["peak"]), epoch=lr["peak_epoch"], step=lr["peak_step"])
        )
        lines.append(
            "- "
            + t["lr_first_last"].format(
                first=f(lr["first"]), last=f(lr["last"]), pct=f(lr["last_pct_of_peak"])
            )
        )
        shape = t[f"shape_{lr['shape']}"].format(warmup=f(lr["warmup_pct"]))
        lines += ["- " + t["lr_shape"].format(shape=shape), ""]
    if report["validation"] is not None:
        lines += _render_validation(report["validation"], t, f)
    lines += _render_stop(report["stop"], t, f)
    if report["figures"]:
        lines += [f"## {t['figures']}", ""]
        for name, filename in report["figures"].items():
            lines += [f"![{t[f'fig_{name}']}]({filename})", "", f"*{t[f'fig_{name}']}*", ""]
    lines += [f"## {t['recommendations']}", ""]
    for item in report["recommendations"]:
        lines.append("- " + _render_recommendation(item, report, t, f))
    if not report["recommendations"]:
        lines.append("- " + t["no_recommendations"])
    lines.append("")
    if report["notes"]:
        lines += [f"## {t['notes']}", ""]
        for note in report["notes"]:
            params = {key: value for key, value in note.items() if key != "key"}
            lines.append("- " + t[f"note_{note['key']}"].format(**params))
        lines.append("")
    return "\n".join(lines)


def _render_general(g: dict[str, Any], t: dict[str, str], f, language: str) -> list[str]:
    rows = [
        (t["base_model"], f(g["base_model"])),
        (t["parameters"], fmt_count(g["total_parameters"], language)),
        (
            t["trainable"],
            t["trainable_value"].format(
                count=fmt_count(g["trainable_parameters"], language), pct=f(g["trainable_pct"])
            )
            if g["trainable_parameters"] is not None
            else t["unknown"],
        ),
        (t["hardware"], _render_hardware(g["hardware"], t, f)),
        (t["precision"], f(g["precision"])),
        (t["quantization"], f(g["quantization"])),
        (t["epochs"], t["epochs_value"].format(run=f(g["epochs_run"]), max=f(g["max_epochs"]))),
        (t["steps"], f(g["optimizer_steps"])),
    ]
    if g["started_at"] is not None:
        rows.append((t["started"], f"{g['started_at']} / {f(g['ended_at'])}"))
    if g["duration_parts"] is not None:
        parts = [
            t[unit if count != 1 else unit[:-1]].format(n=count)
            for unit, count in g["duration_parts"].items()
            if count
        ]
        rows.append(
            (
                t["duration"],
                t["duration_value"].format(parts=", ".join(parts), minutes=f(g["duration_minutes"])),
            )
        )
    else:
        rows.append((t["duration"], t["unknown"]))
    rows += [
        (t["first_loss"].format(epoch=g["first_loss_epoch"]), f(g["first_loss"])),
        (t["final_loss"].format(epoch=g["final_loss_epoch"]), f(g["final_loss"])),
        (t["mean_loss"], f(g["mean_loss"])),
    ]
    if g["trainer_reported_mean_loss"] is not None:
        rows.append((t["reported_mean_loss"], f(g["trainer_reported_mean_loss"])))
    lines = [f"## {t['general']}", "", f"| {t['item']} | {t['value']} |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return lines + [""]


def _render_hardware(hardware: dict[str, Any] | None, t: dict[str, str], f) -> str:
    if not hardware:
        return t["unknown"]
    if hardware.get("kind") == "cuda":
        text = t["gpu"].format(
            name=hardware.get("name"),
            memory=f(hardware.get("memory_mb")),
            sms=f(hardware.get("multiprocessors")),
        )
        if hardware.get("cuda_cores"):
            text += t["cuda_cores"].format(cores=hardware["cuda_cores"])
        return text
    return t["cpu"].format(name=f(hardware.get("name")), cores=f(hardware.get("cores")))


def _render_memory(m: dict[str, Any], t: dict[str, str], f) -> list[str]:
    lines = [
        f"## {t['memory']}",
        "",
        t["memory_device"].format(device=m["device"], budget=f(m["budget_mb"])),
        "",
    ]
    lines += [f"| {t['memory_kind']} | {t['memory_size']} | {t['memory_pct']} |", "|---|---|---|"]
    lines += [
        f"| {t['mem_' + row['name']]} | {f(row['mb'])} | {f(row['percent_of_budget'])} |" for row in m["rows"]
    ]
    lines.append("")
    if m["peak_mb"] is not None and m["budget_mb"]:
        lines.append(
            t["memory_peak"].format(
                peak=f(m["peak_mb"]), pct=f(m["peak_percent_of_budget"]), headroom=f(m["headroom_mb"])
            )
        )
    if m["out_of_memory"]:
        lines.append(t["memory_oom"])
    if m["planner"]:
        p = m["planner"]
        lines.append(
            t["memory_planner"].format(
                estimate=f(p["estimated_peak_mb"]), batch=p["micro_batch"], largest=p["max_micro_batch"]
            )
        )
    return lines + [""]


def _render_phases(p: dict[str, Any], t: dict[str, str], f) -> list[str]:
    lines = [f"## {t['phases']}", ""]
    if p["method"] == "detected":
        o = p["options"]
        lines.append(
            t["phases_detected"].format(
                window=o["window"], ft=f(o["fine_tuning_below"]), st=f(o["stabilization_below"])
            )
        )
    else:
        lines.append(t["phases_given"].format(boundaries=", ".join(str(b) for b in p["boundaries"])))
    if p["online_boundaries"] is not None:
        lines.append(
            t["phases_online"].format(boundaries=", ".join(str(b) for b in p["online_boundaries"]) or "-")
        )
    first, last = p["phases"][0]["first_epoch"], p["phases"][-1]["last_epoch"]
    lines += [
        "",
        "- "
        + t["total_reduction"].format(
            pct=f(p["total_reduction_pct"]),
            start=f(p["start_loss"]),
            end=f(p["end_loss"]),
            first=first,
            last=last,
        ),
        "",
    ]
    if p.get("began_after_last_epoch"):
        lines += [
            t["phase_began_at_end"].format(name=t[f"phase_{p['began_after_last_epoch']}"], epoch=last),
            "",
        ]
    for phase in p["phases"]:
        name = t[f"phase_{phase['name']}"]
        lines += [
            "### "
            + t["phase_heading"].format(
                number=phase["number"], name=name, first=phase["first_epoch"], last=phase["last_epoch"]
            ),
            "",
            "- " + t["start_loss"].format(value=f(phase["start_loss"])),
            "- " + t["end_loss"].format(value=f(phase["end_loss"])),
            "- " + t["improvement"].format(value=f(phase["improvement_pct"])),
            "- " + t["share"].format(value=f(phase["share_of_total_reduction_pct"])),
            "- " + t["phase_epochs"].format(count=phase["epochs"], pct=f(phase["epochs_share_pct"])),
            "",
        ]
    return lines


def _render_validation(v: dict[str, Any], t: dict[str, str], f) -> list[str]:
    lines = [f"## {t['validation']}", ""]
    if v["val_loss"] is not None:
        lines += ["- " + t["val_loss"].format(**{k: f(value) for k, value in v["val_loss"].items()}), ""]
    a = v["answer_accuracy"]
    if a is not None:
        lines += [f"### {t['accuracy']}", ""]
        first_key = "acc_first_before" if a["first_epoch"] == 0 else "acc_first"
        lines.append("- " + t[first_key].format(value=f(a["first"]), epoch=a["first_epoch"]))
        lines.append("- " + t["acc_best"].format(value=f(a["best"]), epoch=a["best_epoch"]))
        lines.append("- " + t["acc_last"].format(value=f(a["last"]), epoch=a["last_epoch"]))
        lines.append(
            "- "
            + t[f"acc_trend_{a['trend']}"].format(
                previous=f(a["previous_pct"]),
                last=f(a["last"]),
                n=a["recent_evaluations"],
                spread=f(a["recent_spread_points"]),
            )
        )
        lines.append("")
    return lines


def _render_stop(stop: dict[str, Any], t: dict[str, str], f) -> list[str]:
    reason = stop.get("reason", "unknown")
    template = t.get(f"stop_{reason}", t["stop_unknown"])
    fields = {
        "epoch": f(stop.get("epoch")),
        "step": f(stop.get("step")),
        "max_steps": f(stop.get("max_steps")),
        "exception": stop.get("exception", t["unknown"]),
        "callback": stop.get("callback", t["unknown"]),
    }
    lines = [f"## {t['stop']}", "", "- " + template.format(**fields)]
    if stop.get("message"):
        lines.append("- " + t["stop_message"].format(message=stop["message"]))
    return lines + [""]


def _render_recommendation(item: dict[str, Any], report: dict[str, Any], t: dict[str, str], f) -> str:
    kind = item["kind"]
    if kind == "max_epochs":
        return t["rec_max_epochs"].format(
            epoch=item["epoch"],
            remaining=f(item["remaining_reduction_pct"]),
            threshold=f(item["threshold_pct"]),
            saved=item["epochs_saved"],
            saved_pct=f(item["epochs_saved_pct"]),
        )
    if kind == "still_improving":
        return t["rec_still_improving"].format(window=item["window"], improvement=f(item["improvement_pct"]))
    if kind == "larger_micro_batch":
        return t["rec_larger_micro_batch"].format(
            pct=f(item["peak_percent_of_budget"]),
            budget=f(item["budget_mb"]),
            headroom=f(item["headroom_mb"]),
            largest=item["max_micro_batch"],
            batch=item["micro_batch"],
        )
    if kind == "memory_tight":
        return t["rec_memory_tight"].format(
            pct=f(item["peak_percent_of_budget"]),
            threshold=f(item["threshold_pct"]),
            headroom=f(item["headroom_mb"]),
        )
    if kind == "accuracy_falling":
        return t["rec_accuracy_falling"].format(epoch=report["validation"]["answer_accuracy"]["best_epoch"])
    if kind == "truncated":
        return t["rec_truncated"].format(count=item["count"], max_length=f(item["max_length"]))
    return t[f"rec_{kind}"]


# ------------------------------------------------------------------------------------------------ output
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
