"""TensorBoardDashboard: makes TensorBoard the window on a run. It writes a custom-scalars layout (one section
per concern: loss, answer accuracy, learning rate and grad norm, memory), draws the phase transitions and the
plateau stop as marker points on the loss chart, and logs the run's hyperparameters with its final metrics so
the HParams tab compares runs. Always on in fit when a TensorBoard logger exists.
"""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.memory import GPUMemoryProfiler
from callbacks.phase_lr import PhaseAwareLR
from callbacks.phases import PhaseDetection
from callbacks.plateau import PlateauStopping
from phi2tutor.keys import (
    ACCURACY_KEY,
    GRAD_NORM_KEY,
    HPARAM_METRIC_KEYS,
    INVALID_RATE_KEY,
    LOSS_EPOCH_KEY,
    LOSS_STEP_KEY,
    LR_KEY,
    LR_SHORTENED_MARKER,
    MEMORY_BUDGET_KEY,
    MEMORY_PREFIX,
    PHASE_INDEX_KEY,
    PHASE_TRANSITION_MARKER,
    PLATEAU_STOP_MARKER,
    VAL_LOSS_KEY,
)

# Module and data options shown as HParams columns (when the run has them).
MODEL_HPARAMS = ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "quantization", "optimizer")
DATA_HPARAMS = ("batch_size", "max_length")


def _exact(*tags: str) -> list[str]:
    # Custom-scalars charts take regular expressions; anchor them so "train/loss" is not "train/loss_epoch".
    return ["^" + re.escape(tag) + "$" for tag in tags]


def dashboard_layout() -> dict[str, dict[str, list]]:
    """The custom-scalars layout, in the order TensorBoard shows it (torch's add_custom_scalars format)."""
    return {
        "1 loss": {
            "loss: train per step, train per epoch, val; markers: phase transitions, plateau stop": [
                "Multiline",
                _exact(
                    LOSS_STEP_KEY, LOSS_EPOCH_KEY, VAL_LOSS_KEY, PHASE_TRANSITION_MARKER, PLATEAU_STOP_MARKER
                ),
            ],
            "phase index (0 rapid learning, 1 fine-tuning, 2 stabilization)": [
                "Multiline",
                _exact(PHASE_INDEX_KEY),
            ],
        },
        "2 answer accuracy": {
            "answer accuracy and invalid rate (held-out problems)": [
                "Multiline",
                _exact(ACCURACY_KEY, INVALID_RATE_KEY),
            ],
        },
        "3 learning rate and grad norm": {
            "learning rate; marker: shortened by PhaseAwareLR": [
                "Multiline",
                _exact(LR_KEY, LR_SHORTENED_MARKER),
            ],
            "grad norm (before clipping)": ["Multiline", _exact(GRAD_NORM_KEY)],
        },
        "4 memory": {
            "memory (MB) and budget": ["Multiline", ["^" + MEMORY_PREFIX, "^" + MEMORY_BUDGET_KEY + "$"]],
        },
    }


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


class TensorBoardDashboard(Callback):
    def __init__(self, log_hparams: bool = True) -> None:
        """Write phi2tutor's TensorBoard dashboard (CUSTOM SCALARS), loss-chart markers and HParams rows.

        Args:
            log_hparams: Log the hyperparameters with the run's final metrics for the HParams tab when fit ends.
        """
        self.log_hparams = log_hparams
        self.epoch_steps: dict[int, tuple[int, float]] = {}  # epoch (1-based) -> (logger step, epoch loss)
        self.marked_transitions = 0
        self.marked_stop = False
        self.marked_lr_shortened = False
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.best_answer_accuracy: float | None = None
        self.epochs_run = 0

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    @staticmethod
    def _step(trainer: pl.Trainer) -> int:
        # The step Lightning gives logged metrics (train/loss_epoch is written at it).
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    @staticmethod
    def _callback(trainer: pl.Trainer, kind: type[Callback]):
        return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        logger.experiment.add_custom_scalars(dashboard_layout())
        profiler = self._callback(trainer, GPUMemoryProfiler)
        if profiler is not None:
            logger.log_metrics({MEMORY_BUDGET_KEY: float(profiler.budget_mb)}, step=self._step(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self.epochs_run = epoch
        loss = trainer.callback_metrics.get(LOSS_EPOCH_KEY)
        if loss is not None:
            # Lightning writes epoch metrics one step back (fit_loop.on_advance_end), after this hook.
            self.epoch_steps[epoch] = (self._step(trainer) - 1, float(loss))
        self._mark(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        if VAL_LOSS_KEY in metrics:
            self.last_val_loss = float(metrics[VAL_LOSS_KEY])
            self.best_val_loss = min(self.last_val_loss, self.best_val_loss or float("inf"))
        if ACCURACY_KEY in metrics:
            accuracy = float(metrics[ACCURACY_KEY])
            self.best_answer_accuracy = max(accuracy, self.best_answer_accuracy or float("-inf"))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark(trainer)
        logger = self._tensorboard(trainer)
        profiler = self._callback(trainer, GPUMemoryProfiler)
        if logger is not None and profiler is not None and trainer.is_global_zero:
            # A second point, so the budget is drawn as a line across the run.
            logger.log_metrics({MEMORY_BUDGET_KEY: float(profiler.budget_mb)}, step=self._step(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._tensorboard(trainer)
        if self.log_hparams and logger is not None and trainer.is_global_zero:
            self._log_hparams(trainer, pl_module, logger)

    # ------------------------------------------------------------------ markers
    def _mark(self, trainer: pl.Trainer) -> None:
        """Loss-chart points: each phase transition at its boundary epoch, the plateau stop at its epoch;
        a learning-rate point where PhaseAwareLR shortened the schedule."""
        logger = self._tensorboard(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        detector = self._callback(trainer, PhaseDetection)
        if detector is not None and detector.unit == "epoch":
            transitions = detector.transitions
            while self.marked_transitions < len(transitions):
                transition = transitions[self.marked_transitions]
                step, _ = self.epoch_steps.get(transition.boundary, (self._step(trainer), 0.0))
                logger.log_metrics({PHASE_TRANSITION_MARKER: float(transition.loss_at_boundary)}, step=step)
                self.marked_transitions += 1
        plateau = self._callback(trainer, PlateauStopping)
        if plateau is not None and not self.marked_stop and plateau.stopped_at_epoch is not None:
            step, loss = self.epoch_steps.get(plateau.stopped_at_epoch, (self._step(trainer), None))
            if loss is not None:
                logger.log_metrics({PLATEAU_STOP_MARKER: loss}, step=step)
                self.marked_stop = True
        phase_lr = self._callback(trainer, PhaseAwareLR)
        if phase_lr is not None and not self.marked_lr_shortened and phase_lr.shortened_at_step is not None:
            # LearningRateMonitor logs the rate of step s at logger step s: the point sits on the curve's bend.
            logger.log_metrics({LR_SHORTENED_MARKER: phase_lr.start_lr}, step=phase_lr.shortened_at_step)
            self.marked_lr_shortened = True

    # ------------------------------------------------------------------ hparams
    def final_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The run's final metrics for the HParams tab (only those the run has)."""
        values: dict[str, float | None] = {
            "final_train_loss": _plain(trainer.callback_metrics.get(LOSS_EPOCH_KEY)),
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "best_answer_accuracy": self.best_answer_accuracy,
            "epochs_run": float(self.epochs_run),
            "peak_memory_mb": self._peak_memory_mb(trainer),
        }
        return {HPARAM_METRIC_KEYS[name]: float(v) for name, v in values.items() if v is not None}

    def _peak_memory_mb(self, trainer: pl.Trainer) -> float | None:
        profiler = self._callback(trainer, GPUMemoryProfiler)
        if profiler is not None:
            return profiler.peak_mb(profiler.measure())
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            return torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20
        return None

    def run_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        module_hparams = getattr(pl_module, "hparams", {}) or {}
        params = {name: _plain(module_hparams[name]) for name in MODEL_HPARAMS if name in module_hparams}
        datamodule = trainer.datamodule
        data_hparams = getattr(datamodule, "hparams", {}) or {}
        params.update({name: _plain(data_hparams[name]) for name in DATA_HPARAMS if name in data_hparams})
        params["accumulate_grad_batches"] = trainer.accumulate_grad_batches
        params["precision"] = str(trainer.precision)
        return {name: ("none" if value is None else value) for name, value in params.items()}

    def _log_hparams(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, logger: TensorBoardLogger
    ) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metrics = self.final_metrics(trainer)
        # The HParams tab reads each metric as the last value of a scalar of that tag.
        logger.log_metrics(metrics, step=self._step(trainer))
        # torch's summary writer directly, not logger.log_hyperparams: that would also rewrite hparams.yaml
        # with these flattened columns.
        writer = logger.experiment._get_file_writer()
        for summary in hparams_summary(self.run_hparams(trainer, pl_module), metrics):
            writer.add_summary(summary)
        writer.flush()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch_steps": {str(k): list(v) for k, v in self.epoch_steps.items()},
            "marked_transitions": self.marked_transitions,
            "marked_stop": self.marked_stop,
            "marked_lr_shortened": self.marked_lr_shortened,
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "best_answer_accuracy": self.best_answer_accuracy,
            "epochs_run": self.epochs_run,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_steps = {
            int(k): (int(v[0]), float(v[1])) for k, v in state_dict.get("epoch_steps", {}).items()
        }
        self.marked_transitions = int(state_dict.get("marked_transitions", 0))
        self.marked_stop = bool(state_dict.get("marked_stop", False))
        self.marked_lr_shortened = bool(state_dict.get("marked_lr_shortened", False))
        self.best_val_loss = state_dict.get("best_val_loss")
        self.last_val_loss = state_dict.get("last_val_loss")
        self.best_answer_accuracy = state_dict.get("best_answer_accuracy")
        self.epochs_run = int(state_dict.get("epochs_run", 0))
