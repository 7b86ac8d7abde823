"""Reading a run into one record: a phi2tutor run directory (TensorBoard events, run.json, memory.json,
config.yaml) or a Hugging Face Trainer trainer_state.json, whatever wrote it. Values are kept as logged,
NaN and inf included, so the analysis can say where they appear.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi2tutor.errors import Phi2TutorError
from phi2tutor.events import event_files, read_scalars
from phi2tutor.keys import (
    ACCURACY_KEY,
    CALCULATOR_CALLS_KEY,
    CALCULATOR_CHANGED_KEY,
    CONFIG_YAML,
    EPOCH_KEY,
    GRAD_NORM_KEY,
    LOSS_EPOCH_KEY,
    LOSS_STEP_KEY,
    LR_KEY,
    MEMORY_JSON,
    MEMORY_PREFIX,
    PHASE_INDEX_KEY,
    RUN_JSON,
    TRAINER_STATE_JSON,
    TRUNCATED_KEY,
    VAL_LOSS_KEY,
)

PHI2TUTOR_RUN = "phi2tutor-run"
TRAINER_STATE = "trainer_state"

# Trainer bookkeeping logged beside the eval metrics: not a metric of the model.
_EVAL_BOOKKEEPING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_tokens")


@dataclass(frozen=True)
class Point:
    """One logged value: at optimizer ``step``, at ``epoch`` (a real number: a step of epoch e lies in
    (e-1, e]), as logged (may be NaN or inf)."""

    step: int
    epoch: float
    value: float


@dataclass
class PhaseChecks:
    """The series a run's PhaseDetection judged (run.json): its monitor's value at every check."""

    monitor: str
    unit: str  # "epoch" or "step"
    every_n_steps: int | None
    positions: list[int]
    values: list[float]


@dataclass
class RunRecords:
    """What a run left behind, in one shape whatever wrote it.

    Attributes:
        source: the path read.
        source_kind: ``"phi2tutor-run"`` or ``"trainer_state"``: decides the vocabulary of the advice.
        run_name: the run's own name (run directory, the folder holding trainer_state.json, or the model).
        train_losses: every logged training loss.
        epoch_losses: (epoch, loss) of complete epochs: the logged epoch mean (phi2tutor), or the mean of
            the logged points of each complete epoch (Trainer).
        grad_norms, learning_rates, val_losses: logged points.
        eval_metrics: other evaluation metrics under their own names (eval_accuracy, eval_f1, ...).
        answer_accuracy: (epoch, fraction) of phi2tutor's val/answer_accuracy; epoch 0 is before training.
        calculator_counts: (epoch, count) of val/calculator_calls and val/calculator_changed under "calls"
            and "changed" (MathAnswerEval logs them when the calculator is on).
        epochs_run: the epoch the run reached (fractional for a step-based or interrupted run).
        phase_checks: the values the run's PhaseDetection checked (run.json), when it recorded them.
    """

    source: str
    source_kind: str
    run_name: str
    train_losses: list[Point] = field(default_factory=list)
    epoch_losses: list[tuple[int, float]] = field(default_factory=list)
    grad_norms: list[Point] = field(default_factory=list)
    learning_rates: list[Point] = field(default_factory=list)
    val_losses: list[Point] = field(default_factory=list)
    eval_metrics: dict[str, list[Point]] = field(default_factory=dict)
    answer_accuracy: list[tuple[int, float]] = field(default_factory=list)
    calculator_counts: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    memory_series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    memory: dict[str, Any] | None = None
    run_info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    truncated_examples: int | None = None
    online_phase_boundaries: list[int] | None = None
    phase_options: dict[str, Any] | None = None
    phase_checks: PhaseChecks | None = None
    trainer_reported_mean_loss: float | None = None
    epochs_run: float | None = None


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


# ------------------------------------------------------------------------------------------ phi2tutor run
class _EpochIndex:
    """Maps logged steps to epochs with the ``epoch`` scalar Lightning writes at every logged step.

    ``first_epoch_steps`` (run.json's steps_per_epoch) places the steps of a first epoch the run did not
    complete as the share of the epoch they are; without it a partial epoch's last logged step reads as its
    end.
    """

    def __init__(
        self,
        epoch_points: list[tuple[int, float]],
        epoch_end_steps: list[int],
        first_epoch_steps: int | None = None,
    ) -> None:
        self.first_epoch_steps = first_epoch_steps if not epoch_end_steps else None
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
        if epoch == 1 and self.first_epoch_steps:  # optimizer steps count from 0 in the first epoch
            return min(1.0, (step + 1) / self.first_epoch_steps)
        first, last = self.bounds.get(epoch, (step, step))
        return epoch - 1 + (min(max(step, first), last) - first + 1) / (last - first + 1)

    def point(self, step: int, value: float) -> Point:
        return Point(int(step), self.position(step), float(value))


def read_run_directory(run_dir: str | Path) -> RunRecords:
    """Records of a phi2tutor run directory: event files, and run.json, memory.json, config.yaml if there."""
    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir)
    loss_epoch = scalars.get(LOSS_EPOCH_KEY, [])
    run_info = _read_json_file(run_dir / RUN_JSON) or {}
    steps_per_epoch = run_info.get("steps_per_epoch")
    index = _EpochIndex(
        scalars.get(EPOCH_KEY, []),
        [step for step, _ in loss_epoch],
        int(steps_per_epoch) if is_number(steps_per_epoch) and steps_per_epoch > 0 else None,
    )
    records = RunRecords(source=str(run_dir), source_kind=PHI2TUTOR_RUN, run_name=run_dir.name)
    by_epoch: dict[int, float] = {}
    for step, value in loss_epoch:
        by_epoch[index.epoch_of(step)] = float(value)
    records.epoch_losses = sorted(by_epoch.items())
    records.train_losses = [index.point(step, v) for step, v in scalars.get(LOSS_STEP_KEY, [])]
    records.grad_norms = [index.point(step, v) for step, v in scalars.get(GRAD_NORM_KEY, [])]
    lr_key = LR_KEY if LR_KEY in scalars else next((k for k in sorted(scalars) if k.startswith("lr-")), None)
    if lr_key is not None:
        records.learning_rates = [index.point(step, v) for step, v in scalars[lr_key]]
    # A validation point belongs to the end of its epoch: x = epoch, where that epoch's mean is drawn.
    records.val_losses = [
        Point(int(step), float(index.epoch_of(step)), float(v)) for step, v in scalars.get(VAL_LOSS_KEY, [])
    ]
    # A value at step 0 graded the untouched base (MathAnswerEval's evaluate_before_training): epoch 0.
    records.answer_accuracy = [
        (0 if step == 0 else index.epoch_of(step), float(v)) for step, v in scalars.get(ACCURACY_KEY, [])
    ]
    records.calculator_counts = {
        name: [(0 if step == 0 else index.epoch_of(step), float(v)) for step, v in scalars[key]]
        for name, key in (("calls", CALCULATOR_CALLS_KEY), ("changed", CALCULATOR_CHANGED_KEY))
        if scalars.get(key)
    }
    records.memory_series = {
        tag: [(step, float(v)) for step, v in points]
        for tag, points in sorted(scalars.items())
        if tag.startswith(MEMORY_PREFIX)
    }
    if scalars.get(TRUNCATED_KEY):
        records.truncated_examples = int(scalars[TRUNCATED_KEY][-1][1])
    records.run_info = run_info
    records.memory = _read_json_file(run_dir / MEMORY_JSON)
    records.config = _read_yaml_file(run_dir / CONFIG_YAML)
    epochs_run = records.run_info.get("epochs_run")
    records.epochs_run = float(epochs_run) if is_number(epochs_run) else float(len(records.epoch_losses))
    detection = records.run_info.get("phase_detection") or _phase_detection_from_config(records.config)
    if detection:
        records.phase_options = {
            key: detection[key]
            for key in ("window", "fine_tuning_below", "stabilization_below")
            if detection.get(key) is not None
        }
        if detection.get("boundaries") is not None:
            records.online_phase_boundaries = [int(b) for b in detection["boundaries"]]
        records.phase_checks = _phase_checks(detection)
    if records.online_phase_boundaries is None and scalars.get(PHASE_INDEX_KEY):
        records.online_phase_boundaries = _boundaries_from_phase_index(
            [(index.epoch_of(step), int(v)) for step, v in scalars[PHASE_INDEX_KEY]]
        )
    return records


# ---------------------------------------------------------------------------------------- Trainer state
def read_trainer_state(path: str | Path) -> RunRecords:
    """Records of a Hugging Face Trainer run from its trainer_state.json (log_history entries with loss,
    grad_norm, learning_rate, epoch, eval_*; stateful_callbacks for why it stopped); a memory.json next to
    it is read too."""
    path = Path(path)
    what_to_do = (
        "Give the trainer_state.json that the Hugging Face Trainer writes into output_dir/checkpoint-N/, "
        "as written."
    )
    try:
        # Python's json reads the bare NaN and Infinity the Trainer writes for a diverged loss.
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
        for key in ("loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "train_loss", "step"):
            if key in entry and not is_number(entry[key]):
                raise Phi2TutorError(
                    f"{path}: log_history entry {number} has {key}={entry[key]!r}, not a number. {what_to_do}"
                )
    if not any("loss" in entry and "epoch" in entry for entry in entries):
        raise Phi2TutorError(
            f"{path} logs no training loss: no log_history entry has both 'loss' and 'epoch'. Train with "
            f"logging_steps small enough to log at least once. {what_to_do}"
        )
    records = RunRecords(source=str(path), source_kind=TRAINER_STATE, run_name=_trainer_run_name(path))
    for entry in entries:
        if "epoch" not in entry:
            continue

        def point(key: str, entry: dict[str, Any] = entry) -> Point:
            return Point(int(entry.get("step", 0)), float(entry["epoch"]), float(entry[key]))

        if "loss" in entry:
            records.train_losses.append(point("loss"))
            if "grad_norm" in entry:
                records.grad_norms.append(point("grad_norm"))
            if "learning_rate" in entry:
                records.learning_rates.append(point("learning_rate"))
        if "eval_loss" in entry:
            records.val_losses.append(point("eval_loss"))
        for key, value in sorted(entry.items()):
            if key.startswith("eval_") and key != "eval_loss" and key not in _EVAL_BOOKKEEPING:
                if is_number(value):
                    records.eval_metrics.setdefault(key, []).append(point(key))
        if is_number(entry.get("train_loss")):
            records.trainer_reported_mean_loss = float(entry["train_loss"])
        if _is_finite(entry.get("train_runtime")):
            records.run_info["duration_seconds"] = float(entry["train_runtime"])
    accuracy = records.eval_metrics.get("eval_answer_accuracy")
    if accuracy:  # phi2tutor's own metric, logged by an HF run: the same meaning
        records.answer_accuracy = [(epoch_index(p.epoch), p.value) for p in accuracy]
    epoch = state.get("epoch")
    records.epochs_run = float(epoch) if is_number(epoch) else records.train_losses[-1].epoch
    records.epoch_losses = _complete_epoch_means(records.train_losses, records.epochs_run)
    records.run_info.update(
        {
            "epochs_run": records.epochs_run,
            "max_epochs": state.get("num_train_epochs"),
            "max_steps": state.get("max_steps"),
            "global_step": state.get("global_step"),
            "stop": trainer_state_stop(state),
            "best_metric": state.get("best_metric"),
            "best_model_checkpoint": state.get("best_model_checkpoint"),
        }
    )
    records.memory = _read_json_file(path.parent / MEMORY_JSON)
    return records


def trainer_state_stop(state: dict[str, Any]) -> dict[str, Any]:
    """Why a Trainer run's state ends where it does, from the state itself.

    ``checkpoint``: TrainerControl's saved ``should_training_stop`` is false, so the state was saved with
    the run still going. ``early_stopping``: EarlyStoppingCallback's patience counter reached its patience.
    ``max_steps``: global_step reached max_steps (the Trainer sets max_steps from num_train_epochs when
    only epochs are given). ``stopped``: should_training_stop true before max_steps, no early-stopping
    state. ``ended_before_max_steps``: an older state with no stateful_callbacks that ends before
    max_steps: a mid-run checkpoint or a stopped run, the file cannot say which.
    """
    step, max_steps = state.get("global_step"), state.get("max_steps")
    callbacks = state.get("stateful_callbacks") or {}
    control = (callbacks.get("TrainerControl") or {}).get("args") or {}
    should_stop = control.get("should_training_stop")
    stopping = callbacks.get("EarlyStoppingCallback") or {}
    if isinstance(stopping, list):  # several instances are saved as a list
        stopping = stopping[0] if stopping else {}
    patience = (stopping.get("args") or {}).get("early_stopping_patience")
    counter = (stopping.get("attributes") or {}).get("early_stopping_patience_counter")
    common = {"step": step, "max_steps": max_steps, "epoch": state.get("epoch")}
    if patience is not None:
        common.update({"patience": patience, "patience_counter": counter})
    reached_max = is_number(step) and is_number(max_steps) and max_steps > 0 and step >= max_steps
    if should_stop is False and not reached_max:
        return {"reason": "checkpoint", **common}
    if is_number(patience) and is_number(counter) and counter >= patience and not reached_max:
        return {
            "reason": "early_stopping",
            "callback": "EarlyStoppingCallback",
            **common,
            **best_model_metric(state),
        }
    if reached_max:
        return {"reason": "max_steps", **common}
    if should_stop is True:
        return {"reason": "stopped", **common}
    if is_number(step) and is_number(max_steps) and max_steps > 0:
        return {"reason": "ended_before_max_steps", **common}
    return {"reason": "unknown", **common}


def best_model_metric(state: dict[str, Any]) -> dict[str, Any]:
    """The metric EarlyStoppingCallback watched (metric_for_best_model, which the state does not name): the
    one eval metric whose value at ``best_global_step`` is the state's ``best_metric``. ``metric`` is None
    when none or several match."""
    best, best_step = state.get("best_metric"), state.get("best_global_step")
    if not _is_finite(best):
        return {"metric": None, "best_metric": None, "best_step": None}
    matches = {
        (key, entry.get("step"))
        for entry in state.get("log_history") or []
        if isinstance(entry, dict) and (best_step is None or entry.get("step") == best_step)
        for key, value in entry.items()
        if key.startswith("eval_") and key not in _EVAL_BOOKKEEPING and value == best
    }
    names = {key for key, _ in matches}
    if len(names) != 1:
        return {"metric": None, "best_metric": float(best), "best_step": best_step}
    (name,) = names
    steps = sorted(step for key, step in matches if step is not None)
    return {
        "metric": name,
        "best_metric": float(best),
        "best_step": best_step or (steps[0] if steps else None),
    }


def _trainer_run_name(path: Path) -> str:
    """The folder that holds trainer_state.json, or the one above a checkpoint-N folder."""
    folder = path.parent.resolve()
    if folder.name.startswith("checkpoint-") and folder.parent.name:
        return f"{folder.parent.name}/{folder.name}"
    if path.name != TRAINER_STATE_JSON:
        return path.stem
    return folder.name or path.stem


def _complete_epoch_means(points: list[Point], epochs_run: float) -> list[tuple[int, float]]:
    """The mean logged loss of each epoch the run completed (a partial last epoch is left out)."""
    grouped: dict[int, list[float]] = {}
    for point in points:
        grouped.setdefault(epoch_index(point.epoch), []).append(point.value)
    return [
        (epoch, sum(values) / len(values))
        for epoch, values in sorted(grouped.items())
        if epoch <= epochs_run + 1e-6
    ]


def epoch_index(epoch: float) -> int:
    """The 1-based epoch a fractional epoch position belongs to."""
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


def _phase_checks(detection: dict[str, Any]) -> PhaseChecks | None:
    checks = detection.get("checks")
    if not isinstance(checks, list) or not checks or not isinstance(detection.get("monitor"), str):
        return None
    if not all(
        isinstance(c, list) and len(c) == 2 and is_number(c[0]) and (c[1] is None or is_number(c[1]))
        for c in checks
    ):
        return None
    return PhaseChecks(
        monitor=detection["monitor"],
        unit="step" if detection.get("unit") == "step" else "epoch",
        every_n_steps=detection.get("check_every_n_steps"),
        positions=[int(position) for position, _ in checks],
        values=[math.nan if value is None else float(value) for _, value in checks],  # null: a NaN or inf
    )


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


def config_value(config: dict[str, Any] | None, section: str, key: str) -> Any:
    """``config[section][key]``, looking inside ``init_args``; None when absent."""
    part = (config or {}).get(section) or {}
    if isinstance(part, dict) and "init_args" in part:
        part = part["init_args"] or {}
    return part.get(key) if isinstance(part, dict) else None


def is_number(value: Any) -> bool:
    """A JSON number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)
