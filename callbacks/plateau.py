"""PlateauStopping: stop training once a metric improves by less than a given fraction over a window of
checks, optionally only in the stabilization phase. Built on Lightning's EarlyStopping, which keeps its
monitor, mode, checkpoint state and cross-process decision; the test is phi2tutor.phases.relative_improvement.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.phases import PhaseDetection, log_text
from phi2tutor.errors import Phi2TutorError
from phi2tutor.keys import LOSS_EPOCH_KEY
from phi2tutor.phases import PHASE_NAMES, relative_improvement, validate_mode, validate_window

STOP_TEXT_TAG = "plateau/stop"
_STABILIZATION = PHASE_NAMES[-1]


class PlateauStopping(EarlyStopping):
    """Stop when the monitored metric's relative improvement over the last ``window`` checks is too small.

    At each check the value joins a history, and the run stops once ``relative_improvement`` of the last
    ``window`` values (the least-squares line's change from its first to its last point, relative to its
    first; see phi2tutor.phases) is below ``min_rel_improvement``: with ``window=10`` and
    ``min_rel_improvement=0.01`` on an epoch loss, under 1% over 10 epochs. It never stops in an epoch
    before ``min_epochs``, and with ``require_stabilization`` only once the run's PhaseDetection callback
    reports "stabilization". A non-finite value stops the run at once, as in EarlyStopping.

    The train metrics (``train/...``) are checked at each train epoch end, with no validation loop needed;
    validation metrics (``val/...``) at each validation end, where PhaseDetection's phase is the one after
    the previous epoch. Why and when it stopped is printed, written to TensorBoard (text ``plateau/stop``),
    and kept in the callback's checkpoint state (``stopping_reason_message``, ``stopped_epoch``) with the
    history, so a resumed run keeps its window. The state reaches a file when a ModelCheckpoint saves after
    the stop check of that epoch: one without a monitor (it saves every epoch) does; one on the monitored
    metric saves, and keeps, only the best epochs, as usual: this callback only ends the run.

    Args:
        monitor: the logged metric to watch, e.g. ``train/loss_epoch`` (mode min) or
            ``val/answer_accuracy`` (mode max). It must be logged by the first check, or the run stops
            with an error that lists the logged metrics.
        mode: ``"min"`` when lower is better (a loss), ``"max"`` when higher is better (an accuracy).
        window: number of checks the relative improvement is measured over (at least 2); no stop before
            this many checks.
        min_rel_improvement: stop when the relative improvement over the window is below this fraction
            (0 <= value < 1; 0.01 = 1%). 0 stops only when the metric got worse over the window.
        min_epochs: never stop in an epoch before this one (1-based; 0 or 1 allow any epoch).
        require_stabilization: stop only once PhaseDetection reports the stabilization phase; the trainer
            must then have a PhaseDetection callback (the one with the same monitor, if several).
        check_on_train_epoch_end: check at train epoch end (True) or at validation end (False). None picks
            validation end for metrics named ``val/...`` or ``val_...``, train epoch end otherwise.
        check_finite: stop at once when the metric becomes NaN or infinite.
        verbose: also print the improvement at every check, not only the stop.
        log_rank_zero_only: with several processes, print only on rank 0.
    """

    def __init__(
        self,
        monitor: str = LOSS_EPOCH_KEY,
        mode: str = "min",
        window: int = 10,
        min_rel_improvement: float = 0.01,
        min_epochs: int = 0,
        require_stabilization: bool = False,
        check_on_train_epoch_end: bool | None = None,
        check_finite: bool = True,
        verbose: bool = False,
        log_rank_zero_only: bool = False,
    ) -> None:
        _validate_arguments(monitor, mode, window, min_rel_improvement, min_epochs)
        # The window rule replaces Lightning's patience rule; patience=window keeps its state meaningful.
        super().__init__(
            monitor=monitor,
            min_delta=0.0,
            patience=window,
            verbose=verbose,
            mode=mode,
            strict=True,
            check_finite=check_finite,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.window = window
        self.min_rel_improvement = min_rel_improvement
        self.min_epochs = min_epochs
        self.require_stabilization = require_stabilization
        self.checked_epochs: list[int] = []
        self.checked_values: list[float] = []
        self.best_epoch: int | None = None
        self.last_relative_improvement: float | None = None
        self._phase_detection: PhaseDetection | None = None
        self._epoch_being_checked = 0
        self._stop_message: str | None = None

    @property
    def stopped_at_epoch(self) -> int | None:
        """The (1-based) epoch the run stopped in, None while it runs."""
        if self.stopping_reason == EarlyStoppingReason.NOT_STOPPED:
            return None
        return self.stopped_epoch + 1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._check_on_train_epoch_end is None:
            self._check_on_train_epoch_end = not _is_validation_metric(self.monitor)
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self._check_on_train_epoch_end:
            if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
                raise Phi2TutorError(
                    f"PlateauStopping checks '{self.monitor}' after validation, but this run has no "
                    "validation (no validation_step, or limit_val_batches=0), so it would never stop. Give "
                    "the module a validation loop, monitor a train metric, or set "
                    "check_on_train_epoch_end=True."
                )
        detectors = [cb for cb in trainer.callbacks if isinstance(cb, PhaseDetection)]
        if self.require_stabilization and not detectors:
            raise Phi2TutorError(
                "PlateauStopping: require_stabilization=True waits for PhaseDetection to report the "
                "stabilization phase, but the Trainer has no PhaseDetection callback. Add one "
                "(callbacks.phases.PhaseDetection) or set require_stabilization=False."
            )
        if detectors:
            # Also without require_stabilization: the stop message then says which phase the run was in.
            same_monitor = [cb for cb in detectors if cb.monitor == self.monitor]
            self._phase_detection = (same_monitor or detectors)[0]

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        # EarlyStopping passes only the metric on; keep what the criterion also needs.
        self._epoch_being_checked = trainer.current_epoch + 1
        self._stop_message = None
        super()._run_early_stopping_check(trainer)
        if self._stop_message is not None and trainer.should_stop:
            rank_zero_info(self._stop_message)
            log_text(trainer, STOP_TEXT_TAG, self._stop_message)

    def _validate_condition_metric(self, logs: dict[str, Tensor]) -> bool:
        if self.monitor in logs:
            return True
        if self.checked_values:
            # Seen before: this check simply has no value (e.g. an accuracy evaluated less often).
            return False
        raise Phi2TutorError(
            f"PlateauStopping monitors '{self.monitor}', but no metric of that name was logged by its first "
            f"check (epoch {self._epoch_being_checked}). Logged metrics: "
            f"{', '.join(repr(key) for key in sorted(logs)) or 'none'}. Set monitor to one of them, or log "
            f"'{self.monitor}' in a training or validation step."
        )

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        if self.check_finite and not torch.isfinite(current):
            should_stop, reason = super()._evaluate_stopping_criteria(current)
            self._stop_message = (
                f"PlateauStopping stopped the run at epoch {self._epoch_being_checked}: {reason}"
            )
            return should_stop, reason
        epoch = self._epoch_being_checked
        self.checked_epochs.append(epoch)
        self.checked_values.append(float(current))
        if self.monitor_op(current, self.best_score.to(current.device)):
            self.best_score = current.detach().cpu()
            self.best_epoch = epoch
            self.wait_count = 0
        else:
            self.wait_count += 1

        improvement = relative_improvement(self.checked_values, self.window, self.mode)
        self.last_relative_improvement = improvement
        if improvement is None:
            seen = f"{len(self.checked_values)}/{self.window} checks seen"
            return False, f"{self.monitor} = {float(current):.4f}; {seen}"
        first_epoch = self.checked_epochs[-self.window]
        measured = (
            f"{self.monitor} improved {100 * improvement:.2f}% over the last {self.window} checks "
            f"(epochs {first_epoch}-{epoch})"
        )
        if math.isnan(improvement) or improvement >= self.min_rel_improvement:
            return False, measured
        if epoch < self.min_epochs:
            return False, f"{measured}, but min_epochs={self.min_epochs} is not reached"
        phase = self._phase_detection.current_phase if self._phase_detection is not None else None
        if self.require_stabilization and phase != _STABILIZATION:
            return False, f"{measured}, but the run is in the {phase} phase, not stabilization"

        self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
        in_phase = f", in the {phase} phase" if phase is not None else ""
        self._stop_message = (
            f"PlateauStopping stopped the run at epoch {epoch}: {measured}, under "
            f"min_rel_improvement={100 * self.min_rel_improvement:g}%{in_phase}. Best {self.monitor} "
            f"{float(self.best_score):.4f} at epoch {self.best_epoch}."
        )
        return True, self._stop_message

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.checked_values and not trainer.fast_dev_run and trainer.current_epoch > 0:
            rank_zero_warn(
                f"PlateauStopping never checked '{self.monitor}': it checks after "
                f"{'each train epoch' if self._check_on_train_epoch_end else 'validation'}, which never ran "
                "with that metric logged."
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "checked_epochs": list(self.checked_epochs),
            "checked_values": list(self.checked_values),
            "best_epoch": self.best_epoch,
            "last_relative_improvement": self.last_relative_improvement,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.checked_epochs = [int(epoch) for epoch in state_dict.get("checked_epochs", [])]
        self.checked_values = [float(value) for value in state_dict.get("checked_values", [])]
        self.best_epoch = state_dict.get("best_epoch")
        self.last_relative_improvement = state_dict.get("last_relative_improvement")


def _validate_arguments(
    monitor: str, mode: str, window: int, min_rel_improvement: float, min_epochs: int
) -> None:
    owner = "PlateauStopping"
    if not isinstance(monitor, str) or not monitor:
        raise Phi2TutorError(
            f"{owner}: monitor={monitor!r} is not a metric name. Give the key a module logs, for example "
            "'train/loss_epoch' or 'val/answer_accuracy'."
        )
    validate_mode(mode, owner)
    validate_window(window, owner, "checks the relative improvement is measured over")
    if (
        isinstance(min_rel_improvement, bool)
        or not isinstance(min_rel_improvement, (int, float))
        or not 0.0 <= min_rel_improvement < 1.0
    ):
        raise Phi2TutorError(
            f"{owner}: min_rel_improvement={min_rel_improvement!r} is out of range. It is the fraction the "
            "metric must improve by over the window to keep training, at least 0 and below 1 (0.01 = 1%)."
        )
    if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 0:
        raise Phi2TutorError(
            f"{owner}: min_epochs={min_epochs!r} is out of range. It is the first epoch the run may stop "
            "in, an integer >= 0 (0 lets it stop as soon as the window is full)."
        )


def _is_validation_metric(monitor: str) -> bool:
    return monitor.startswith(("val/", "val_", "validation/"))
