"""PhaseAwareLR: once PhaseDetection reports that the rapid-learning phase has ended, the rest of the
learning-rate schedule is shortened: the cosine reaches its floor within a given number of epochs (or a given
fraction of the steps it had left) instead of at the end of the whole schedule. The analysis this project grew
from recommends "a faster decay of the learning rate after epoch 50"; this does it when the run's own loss
says learning slowed. The schedule is TutorModule's (phi2tutor.schedule.ShortenableSchedule in its LambdaLR).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

from callbacks.micro_batch import optimizer_steps_per_epoch
from callbacks.phases import PhaseDetection, log_text
from phi2tutor.errors import Phi2TutorError
from phi2tutor.keys import LR_SCHEDULE_TEXT_TAG
from phi2tutor.phases import PHASE_NAMES
from phi2tutor.schedule import SHORTENING_OUTCOMES, ShortenableSchedule

DEFAULT_DECAY_FRACTION = 0.5
"""Without decay_epochs or decay_fraction, the decay takes half the steps it had left: in the reference run
(rapid learning ended at epoch 50 of 150) the rate reaches its floor at epoch 100, where its analysis saw
stabilization begin."""

_RAPID_LEARNING_ENDED = 1  # the index in PHASE_NAMES of the phase that begins when rapid learning ends


class PhaseAwareLR(Callback):
    """Shorten the learning-rate schedule when the rapid-learning phase ends (PhaseDetection's transition).

    At the first check after PhaseDetection announces "fine-tuning", the optimizer step reached is the
    starting point: from there the rate follows a half cosine from its current value down to the schedule's
    floor (``model.min_lr_ratio`` x peak) over ``decay_epochs`` epochs, or over ``decay_fraction`` of the
    steps the schedule still had to its floor, and then stays at the floor. The rate does not jump at the
    change. A decay that would not end sooner than the schedule already does leaves it as it is (and says
    so). The change happens once per run.

    What the run shows: ``train/lr`` (LearningRateMonitor) bends at the change; the decision is printed and
    written as TensorBoard text under ``phase/lr_schedule`` (beside PhaseDetection's ``phase/transitions``),
    and the dashboard marks it on the learning-rate chart (``markers/lr_shortened``). The shortening is part
    of the scheduler's checkpoint state (LambdaLR saves its factor object's numbers) and what was decided is
    this callback's, so a resumed run continues the same rates.

    Needs a PhaseDetection callback in the same Trainer and TutorModule's schedule
    (``phi2tutor.model.warmup_cosine_schedule``, stepped every optimizer step).

    Args:
        decay_epochs: epochs over which the rate falls to its floor once rapid learning has ended (a positive
            number, fractions allowed). Give this or ``decay_fraction``, not both.
        decay_fraction: the share of the steps the schedule still had to its floor that the shortened decay
            takes (strictly between 0 and 1). With neither option given: 0.5.
        phase_monitor: the monitor of the PhaseDetection to follow when the Trainer has several (e.g.
            ``train/loss_epoch``); not needed with one.
    """

    def __init__(
        self,
        decay_epochs: float | None = None,
        decay_fraction: float | None = None,
        phase_monitor: str | None = None,
    ) -> None:
        super().__init__()
        _validate_arguments(decay_epochs, decay_fraction)
        self.decay_epochs = decay_epochs
        self.decay_fraction = (
            DEFAULT_DECAY_FRACTION if decay_epochs is None and decay_fraction is None else decay_fraction
        )
        self.phase_monitor = phase_monitor
        # What was decided, None until rapid learning ends; kept in checkpoints.
        self.decided_at_step: int | None = None
        self.shortened_at_step: int | None = None
        self.decay_steps: int | None = None
        self.steps_left_before: int | None = None
        self.start_lr: float | None = None
        self.floor_lr: float | None = None
        self.message: str | None = None
        self._phase_detection: PhaseDetection | None = None
        self._scheduler: LambdaLR | None = None

    @property
    def ends_at_step(self) -> int | None:
        """The optimizer step at which the shortened decay reaches the floor (None when not shortened)."""
        if self.shortened_at_step is None:
            return None
        return self.shortened_at_step + self.decay_steps

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        detectors = [cb for cb in trainer.callbacks if isinstance(cb, PhaseDetection)]
        if self.phase_monitor is not None:
            detectors = [cb for cb in detectors if cb.monitor == self.phase_monitor]
        if len(detectors) != 1:
            found = [cb.monitor for cb in trainer.callbacks if isinstance(cb, PhaseDetection)]
            if not found:
                problem = (
                    "the Trainer has no PhaseDetection callback. Add one (callbacks.phases.PhaseDetection)"
                )
            elif not detectors:
                problem = (
                    f"no PhaseDetection monitors phase_monitor='{self.phase_monitor}' (they monitor "
                    f"{', '.join(repr(m) for m in found)}). Set phase_monitor to one of them"
                )
            else:
                problem = (
                    f"the Trainer has {len(detectors)} PhaseDetection callbacks (monitoring "
                    f"{', '.join(repr(m) for m in found)}). Set phase_monitor to the one to follow"
                )
            raise Phi2TutorError(
                "PhaseAwareLR shortens the learning-rate schedule when PhaseDetection reports the end of "
                f"the rapid-learning phase, but {problem}, or remove PhaseAwareLR."
            )
        self._phase_detection = detectors[0]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scheduler = _shortenable_scheduler(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Right after PhaseDetection's epoch check when this callback comes after it in the list, so the
        # epoch-end checkpoint already holds the shortened schedule.
        self._maybe_shorten(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Before the next optimizer step whatever the callback order (and after a resume from a checkpoint
        # written between the transition and the change): the scheduler has not stepped since the transition,
        # so the starting step, and with it every later rate, is the same.
        self._maybe_shorten(trainer)

    # ------------------------------------------------------------------ the change
    def _maybe_shorten(self, trainer: pl.Trainer) -> None:
        if self.decided_at_step is not None or self._phase_detection is None or self._scheduler is None:
            return
        transition = next(
            (t for t in self._phase_detection.transitions if t.phase_index == _RAPID_LEARNING_ENDED), None
        )
        if transition is None:
            return
        scheduler = self._scheduler
        step = int(scheduler.last_epoch)  # the step whose rate the next optimizer step uses
        factors = [fn for fn in scheduler.lr_lambdas if isinstance(fn, ShortenableSchedule)]
        steps_left = factors[0].steps_to_floor(step)
        steps_per_epoch = optimizer_steps_per_epoch(trainer)
        decay_steps = self._decay_steps(steps_left, steps_per_epoch)
        peak = float(scheduler.base_lrs[0])
        self.decided_at_step = step
        self.steps_left_before = steps_left
        self.start_lr = peak * factors[0](step)
        self.floor_lr = peak * factors[0].floor
        detector = self._phase_detection
        ended = (
            f"{PHASE_NAMES[0]} ended at {detector.unit} {transition.boundary} "
            f"(PhaseDetection on {detector.monitor})"
        )
        if steps_left == 0:
            self.message = (
                f"PhaseAwareLR: {ended}; the learning rate is already at its floor {self.floor_lr:.3g}: "
                "nothing to shorten."
            )
        elif decay_steps >= steps_left:
            asked = (
                f"decay_epochs={self.decay_epochs:g} ({decay_steps} steps)"
                if self.decay_epochs is not None
                else f"decay_fraction={self.decay_fraction:g}"
            )
            self.message = (
                f"PhaseAwareLR: {ended}; the schedule already reaches its floor {self.floor_lr:.3g} in "
                f"{_steps_and_epochs(steps_left, steps_per_epoch)}, no later than {asked}: left as it is."
            )
        else:
            for factor in factors:
                factor.shorten(step, decay_steps)
            self.shortened_at_step = step
            self.decay_steps = decay_steps
            self.message = (
                f"PhaseAwareLR: {ended}; from optimizer step {step} the learning rate decays from "
                f"{self.start_lr:.3g} to its floor {self.floor_lr:.3g} over "
                f"{_steps_and_epochs(decay_steps, steps_per_epoch)}, to step {step + decay_steps}, "
                f"instead of the {_steps_and_epochs(steps_left, steps_per_epoch)} the schedule had left."
            )
        rank_zero_info(self.message)
        log_text(trainer, LR_SCHEDULE_TEXT_TAG, self.message)

    def _decay_steps(self, steps_left: int, steps_per_epoch: int | None) -> int:
        if self.decay_epochs is not None:
            if steps_per_epoch is None:
                raise Phi2TutorError(
                    f"PhaseAwareLR: decay_epochs={self.decay_epochs:g} needs the number of optimizer steps "
                    "per epoch, and this run's training data has no length (an iterable dataset). Give "
                    "decay_fraction instead (a share of the steps the schedule has left)."
                )
            return max(1, round(self.decay_epochs * steps_per_epoch))
        return max(1, round(self.decay_fraction * steps_left))

    @property
    def outcome(self) -> str:
        """What the callback did, one of phi2tutor.schedule.SHORTENING_OUTCOMES."""
        shortened, at_floor, left_as_is, not_reached = SHORTENING_OUTCOMES
        if self.decided_at_step is None:
            return not_reached
        if self.shortened_at_step is not None:
            return shortened
        return at_floor if self.steps_left_before == 0 else left_as_is

    def run_record(self) -> dict[str, Any]:
        """What run.json keeps of this callback, for the training report (which reads the epoch length from
        run.json's steps_per_epoch)."""
        return {
            "outcome": self.outcome,
            "decay_epochs": self.decay_epochs,
            "decay_fraction": self.decay_fraction,
            "ends_at_step": self.ends_at_step,
            **self.state_dict(),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "decided_at_step": self.decided_at_step,
            "shortened_at_step": self.shortened_at_step,
            "decay_steps": self.decay_steps,
            "steps_left_before": self.steps_left_before,
            "start_lr": self.start_lr,
            "floor_lr": self.floor_lr,
            "message": self.message,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored as decided: the shortened rates themselves come back with the scheduler's state, so a
        # resumed run with other decay options keeps the decay it had.
        for name in self.state_dict():
            setattr(self, name, state_dict.get(name))


def _shortenable_scheduler(trainer: pl.Trainer) -> LambdaLR:
    """The run's LambdaLR with ShortenableSchedule factors, stepped per optimizer step; else a clear error."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if isinstance(scheduler, LambdaLR) and any(
            isinstance(fn, ShortenableSchedule) for fn in scheduler.lr_lambdas
        ):
            if config.interval != "step":
                raise Phi2TutorError(
                    "PhaseAwareLR counts its decay in optimizer steps, but the module's learning-rate "
                    f"scheduler is stepped every '{config.interval}'. Return it from configure_optimizers "
                    "with interval 'step' (TutorModule does)."
                )
            return scheduler
    kinds = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs) or "none"
    raise Phi2TutorError(
        "PhaseAwareLR shortens the warmup + cosine schedule of phi2tutor.model.warmup_cosine_schedule "
        f"(TutorModule's), but this module's configure_optimizers returned other schedulers ({kinds}). Use "
        "TutorModule, build the scheduler with warmup_cosine_schedule, or remove PhaseAwareLR."
    )


def _steps_and_epochs(steps: int, steps_per_epoch: int | None) -> str:
    if steps_per_epoch is None:
        return f"{steps} optimizer steps"
    return f"{steps} optimizer steps ({steps / steps_per_epoch:.3g} epochs)"


def _validate_arguments(decay_epochs: float | None, decay_fraction: float | None) -> None:
    owner = "PhaseAwareLR"
    if decay_epochs is not None and decay_fraction is not None:
        raise Phi2TutorError(
            f"{owner}: decay_epochs={decay_epochs!r} and decay_fraction={decay_fraction!r} are both given, "
            "but they are two ways of saying how long the shortened decay lasts. Give one of them."
        )
    if decay_epochs is not None and not (_is_real(decay_epochs) and decay_epochs > 0):
        raise Phi2TutorError(
            f"{owner}: decay_epochs={decay_epochs!r} is out of range. It is the number of epochs the "
            "learning rate takes to reach its floor once rapid learning has ended: a positive number "
            "(for example 2)."
        )
    if decay_fraction is not None and not (_is_real(decay_fraction) and 0 < decay_fraction < 1):
        raise Phi2TutorError(
            f"{owner}: decay_fraction={decay_fraction!r} is out of range. It is the share of the steps the "
            "schedule still had to its floor that the shortened decay takes: a number strictly between 0 "
            f"and 1 (default {DEFAULT_DECAY_FRACTION})."
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
