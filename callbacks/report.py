"""TrainingReport: when fit ends, or is interrupted, writes run.json (what the event files cannot hold:
model, parameters, hardware, precision, micro-batch and accumulation, time, why it stopped) and the
training report of phi2tutor.report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from callbacks.micro_batch import AutoMicroBatch, batch_numbers, optimizer_steps_per_epoch
from callbacks.phase_lr import PhaseAwareLR
from callbacks.phases import PhaseDetection
from phi2tutor.errors import Phi2TutorError, first_line
from phi2tutor.keys import REPORT_MD, RUN_JSON
from phi2tutor.report import LANGUAGES, write_report
from phi2tutor.report.writer import report_directory

# CUDA cores per streaming multiprocessor by compute capability (NVIDIA's CUDA C Programming Guide,
# "Arithmetic Instructions"); torch reports multiprocessors, not cores.
CUDA_CORES_PER_SM = {
    (6, 0): 64,
    (6, 1): 128,
    (6, 2): 128,
    (7, 0): 64,
    (7, 2): 64,
    (7, 5): 64,
    (8, 0): 64,
    (8, 6): 128,
    (8, 7): 128,
    (8, 9): 128,
    (9, 0): 128,
}


class TrainingReport(Callback):
    """Write the training report into the run directory when fit ends, and when it is interrupted.

    At the end of fit (after every other callback's ``on_fit_end``, so memory.json is there) it writes
    ``run.json`` and then ``report.md``, ``report.json`` and the figures from the run's event files with
    ``phi2tutor.report.write_report``: the same code as ``phi2tutor report RUN_DIR``. On an interruption
    (Ctrl+C) or an error it does the same from what was logged so far, and never hides the original error.

    Args:
        language: language of report.md, ``"en"`` or ``"es"``.
        output_dir: directory for the report; default the run directory (``trainer.log_dir``).
        phase_boundaries: last epochs of the first learning phases, to use instead of detecting them.
        figures: also draw the PNG figures.
    """

    def __init__(
        self,
        language: str = "en",
        output_dir: str | None = None,
        phase_boundaries: list[int] | None = None,
        figures: bool = True,
    ) -> None:
        super().__init__()
        if language not in LANGUAGES:
            raise Phi2TutorError(
                f"TrainingReport: language={language!r} is not available; use one of {', '.join(LANGUAGES)}."
            )
        self.language = language
        self.output_dir = output_dir
        self.phase_boundaries = phase_boundaries
        self.figures = figures
        self.report_path: Path | None = None
        self._started_wall: float | None = None
        self._started_at: str | None = None
        self._written = False
        self._training_started = False
        self._run_dir: Path | None = None
        # Segments of this run before the checkpoint it resumed from: start time and training seconds.
        self._earlier_segments: list[dict[str, Any]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._written = False
            self._training_started = False
            self._earlier_segments = []  # a resumed run gets them back in load_state_dict, after setup
            # Read here, on every process: under DDP trainer.log_dir is a collective (a broadcast from rank 0)
            # that rank 0 alone, or an exception handler, cannot call.
            self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)
            self._mark_start()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The training loop's own duration, as the HF Trainer's train_runtime measures it: model loading
        # and the sanity check are not training.
        self._mark_start()
        self._training_started = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # teardown runs after every callback's on_fit_end (GPUMemoryProfiler writes memory.json there).
        if stage != "fit" or self._written:
            return
        stop = {"reason": "interrupted", "exception": "KeyboardInterrupt"} if trainer.interrupted else None
        try:
            self._write(trainer, pl_module, stop or stop_reason(trainer))
        except Phi2TutorError as error:
            rank_zero_warn(f"TrainingReport: no report written: {error}")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._written or trainer.state.fn != "fit":
            return
        if not self._training_started:
            # A run that failed while loading (bad data, model, option) has nothing to report; the error
            # itself is the message, and no run.json is left for the user to clean up.
            return
        kind = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        stop = {
            "reason": kind,
            "exception": type(exception).__name__,
            "epoch": trainer.current_epoch + 1,
            "message": first_line(exception, 300),
        }
        try:
            self._write(trainer, pl_module, stop)
        except Exception as error:  # the report must never replace the error that stopped the run
            rank_zero_warn(f"TrainingReport: no report written after the {kind} run: {error}")

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint holds the segments so far, this one up to the checkpoint: the time a crashed
        # segment trained after its last checkpoint is redone by the resumed one, and counted there.
        return {"segments": self.segments()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._earlier_segments = [dict(segment) for segment in state_dict.get("segments", [])]

    def segments(self) -> list[dict[str, Any]]:
        """Every training segment of the run (one per start or resume): start time and seconds."""
        current = {
            "started_at": self._started_at,
            "duration_seconds": round(time.time() - self._started_wall, 2) if self._started_wall else None,
        }
        return [*self._earlier_segments, current]

    # ------------------------------------------------------------------------------------------ the work
    def _mark_start(self) -> None:
        self._started_wall = time.time()
        self._started_at = _now_iso()

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stop: dict[str, Any]) -> None:
        self._written = True
        if not trainer.is_global_zero:
            return
        run_dir = self._run_dir or Path(trainer.log_dir or trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # The TensorBoard writer buffers events; what it holds must reach the file the report reads.
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()
        (run_dir / RUN_JSON).write_text(json.dumps(self.run_info(trainer, pl_module, stop), indent=2) + "\n")
        report = write_report(
            run_dir,
            self.output_dir,
            language=self.language,
            phase_boundaries=self.phase_boundaries,
            draw_figures=self.figures,
        )
        self.report_path = report_directory(run_dir, self.output_dir) / REPORT_MD
        general = report["general"]
        if report["phases"] is None:  # stopped before a loss was logged
            rank_zero_info(f"phi2tutor | training report: {self.report_path} | no training loss was logged")
            return
        rank_zero_info(
            f"phi2tutor | training report: {self.report_path} | final loss {general['final_loss']}, mean loss "
            f"{general['mean_loss']}, total loss reduction {report['phases']['total_reduction_pct']}%"
        )

    def run_info(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stop: dict[str, Any]
    ) -> dict[str, Any]:
        """The content of run.json: what the report needs and the event files do not hold."""
        segments = self.segments()
        durations = [segment["duration_seconds"] for segment in segments]
        model = getattr(pl_module, "model", None) or pl_module
        hparams = getattr(pl_module, "hparams", {}) or {}
        info: dict[str, Any] = {
            "base_model": getattr(pl_module, "model_source", None) or hparams.get("model_name_or_path"),
            "model_class": type(_base_model(model)).__name__,
            **count_parameters(model),
            "hardware": describe_hardware(trainer.strategy.root_device),
            "precision": str(trainer.precision),
            "quantization": hparams.get("quantization"),
            "compute_dtype": hparams.get("compute_dtype"),
            "started_at": segments[0]["started_at"],
            "ended_at": _now_iso(),
            # Training time of all segments together (a resumed run continues the interrupted one).
            "duration_seconds": round(sum(durations), 2) if None not in durations else None,
            "segments": segments,
            "epochs_run": trainer.current_epoch,
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "global_step": trainer.global_step,
            "steps_per_epoch": optimizer_steps_per_epoch(trainer),
            "stop": stop,
            "calculator": calculator_info(pl_module),
        }
        auto_batch = next((cb for cb in trainer.callbacks if isinstance(cb, AutoMicroBatch)), None)
        info["micro_batch"] = auto_batch.run_record(trainer) if auto_batch else batch_numbers(trainer)
        detector = next((cb for cb in trainer.callbacks if isinstance(cb, PhaseDetection)), None)
        if detector is not None:
            info["phase_detection"] = {
                "monitor": detector.monitor,
                "window": detector.window,
                "fine_tuning_below": detector.fine_tuning_below,
                "stabilization_below": detector.stabilization_below,
                "unit": detector.unit,
                "check_every_n_steps": detector.check_every_n_steps,
                "boundaries": [transition.boundary for transition in detector.transitions],
                # The series the rule judged, so that the report judges the same one: by step it is every
                # checked value, which the logged train/loss (every log_every_n_steps) does not hold. A NaN or
                # inf is written as null: run.json stays strict JSON.
                "checks": [
                    [position, value if math.isfinite(value) else None]
                    for position, value in zip(detector.positions, detector.values)
                ],
            }
        phase_lr = next((cb for cb in trainer.callbacks if isinstance(cb, PhaseAwareLR)), None)
        if phase_lr is not None:
            info["phase_aware_lr"] = phase_lr.run_record()
        return info


def calculator_info(pl_module: pl.LightningModule) -> dict[str, bool] | None:
    """Whether the run's answers (MathAnswerEval, validate, test) were decoded with the calculator, and
    whether its training data carried calculator annotations; None for a module without the option."""
    if not hasattr(pl_module, "calculator_enabled"):
        return None
    return {
        "enabled": bool(pl_module.calculator_enabled),
        "annotated_training_data": bool(getattr(pl_module, "trained_with_annotations", False)),
    }


def stop_reason(trainer: pl.Trainer) -> dict[str, Any]:
    """Why a fit that ended normally stopped: an early-stopping callback, max_steps, max_epochs, or another
    callback that set ``trainer.should_stop``."""
    for callback in trainer.callbacks:
        reason = getattr(callback, "stopping_reason", None)
        if reason is not None and getattr(reason, "name", "NOT_STOPPED") != "NOT_STOPPED":
            name = type(callback).__name__
            return {
                "reason": "plateau" if name == "PlateauStopping" else "early_stopping",
                "callback": name,
                "epoch": getattr(callback, "stopped_epoch", trainer.current_epoch - 1) + 1,
                "message": getattr(callback, "stopping_reason_message", None),
            }
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return {"reason": "max_steps", "step": trainer.max_steps}
    if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
        return {"reason": "max_epochs", "epoch": trainer.max_epochs}
    if trainer.should_stop:
        return {"reason": "stopped", "epoch": trainer.current_epoch}
    return {"reason": "unknown"}


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameters; peft's count for a peft model (a 4-bit element is two weights)."""
    if callable(getattr(model, "get_nb_trainable_parameters", None)):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_parameters": int(total), "trainable_parameters": int(trainable)}


def describe_hardware(device: torch.device) -> dict[str, Any]:
    """The GPU's name, memory, multiprocessors (and CUDA cores where the architecture is known), or the CPU."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        cores_per_sm = CUDA_CORES_PER_SM.get((properties.major, properties.minor))
        return {
            "kind": "cuda",
            "name": properties.name,
            "memory_mb": round(properties.total_memory / 2**20),
            "multiprocessors": properties.multi_processor_count,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "cuda_cores": properties.multi_processor_count * cores_per_sm if cores_per_sm else None,
        }
    return {
        "kind": device.type,
        "name": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
