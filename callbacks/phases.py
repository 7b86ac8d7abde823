"""PhaseDetection: names the learning phase of a run while it trains (rapid learning, fine-tuning,
stabilization), logs it to TensorBoard and announces each transition. The rule is phi2tutor.phases's
PhaseTracker, the same one the training report applies to the finished run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from phi2tutor.errors import Phi2TutorError
from phi2tutor.keys import LOSS_EPOCH_KEY, PHASE_INDEX_KEY, TRANSITIONS_TEXT_TAG
from phi2tutor.phases import (
    DEFAULT_FINE_TUNING_BELOW,
    DEFAULT_PHASE_WINDOW,
    DEFAULT_STABILIZATION_BELOW,
    PHASE_NAMES,
    PhaseAnalysis,
    PhaseTracker,
    PhaseTransition,
    rate_pct,
)


class PhaseDetection(Callback):
    """Detect the run's learning phase online, from a logged metric, by the PhaseTracker rule.

    Every check (each train epoch end, or every ``check_every_n_steps`` optimizer steps) feeds the
    monitored value to a ``phi2tutor.phases.PhaseTracker`` (its rule, and the evidence test a boundary must
    pass, are in phi2tutor/phases.py's docstring), logs ``phase/index`` (0 rapid learning,
    1 fine-tuning, 2 stabilization: the phase of the checked epoch, so the logged series matches the
    report's offline boundaries), and at a transition prints it and writes a TensorBoard text entry under
    ``phase/transitions``. The history lives in ``state_dict``, so a resumed run continues in its phase.

    Other callbacks and the report read ``current_phase``, ``current_phase_index``, ``transitions``,
    ``positions``/``values`` and ``analysis()``. All processes keep the same history: the value is taken
    from rank 0.

    Args:
        monitor: the logged metric to follow. ``train/loss_epoch`` is the epoch mean of ``train/loss``.
            It must be logged in a training or validation step, so it is ready when the check runs.
        mode: ``"min"`` for a loss, ``"max"`` for a metric that should rise.
        window: checks the improvement rate is measured over (at least 2). No phase can end before this
            many checks; longer windows resist noise and delay boundaries by about half a window.
        fine_tuning_below: fine-tuning begins after the first check whose improvement rate is below this
            fraction of the fastest rate seen so far (strictly between 0 and 1).
        stabilization_below: stabilization begins after the first later check whose rate is below this
            fraction of the fastest rate; smaller than ``fine_tuning_below``.
        check_every_n_steps: check every this many optimizer steps instead of every epoch (then monitor a
            per-step metric such as ``train/loss_step``, and the thresholds refer to rates per check).
            None checks at every train epoch end.
    """

    def __init__(
        self,
        monitor: str = LOSS_EPOCH_KEY,
        mode: str = "min",
        window: int = DEFAULT_PHASE_WINDOW,
        fine_tuning_below: float = DEFAULT_FINE_TUNING_BELOW,
        stabilization_below: float = DEFAULT_STABILIZATION_BELOW,
        check_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise Phi2TutorError(
                f"PhaseDetection: monitor={monitor!r} is not a metric name. Give the key a module logs, "
                "for example 'train/loss_epoch'."
            )
        if check_every_n_steps is not None and (
            isinstance(check_every_n_steps, bool)
            or not isinstance(check_every_n_steps, int)
            or check_every_n_steps < 1
        ):
            raise Phi2TutorError(
                f"PhaseDetection: check_every_n_steps={check_every_n_steps!r} is out of range. Give a "
                "positive number of optimizer steps between checks, or None to check at every train "
                "epoch end."
            )
        self.monitor = monitor
        self.mode = mode
        self.window = window
        self.fine_tuning_below = fine_tuning_below
        self.stabilization_below = stabilization_below
        self.check_every_n_steps = check_every_n_steps
        self._tracker = PhaseTracker(
            window, fine_tuning_below, stabilization_below, mode, owner="PhaseDetection"
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @property
    def unit(self) -> str:
        """What the positions count: ``"epoch"`` (1-based) or ``"step"`` (the global step)."""
        return "epoch" if self.check_every_n_steps is None else "step"

    @property
    def current_phase_index(self) -> int:
        """Index in PHASE_NAMES of the phase the run is in now (after the latest check)."""
        return self._tracker.phase_index

    @property
    def current_phase(self) -> str:
        """Name of the phase the run is in now: "rapid learning", "fine-tuning" or "stabilization"."""
        return PHASE_NAMES[self._tracker.phase_index]

    @property
    def transitions(self) -> list[PhaseTransition]:
        return list(self._tracker.transitions)

    @property
    def positions(self) -> list[int]:
        """The epoch (or step) of every check so far."""
        return list(self._tracker.positions)

    @property
    def values(self) -> list[float]:
        """The monitored value at every check so far."""
        return list(self._tracker.values)

    def analysis(self) -> PhaseAnalysis:
        """The phases of the run so far, with the same numbers the training report computes."""
        return self._tracker.analysis(unit=self.unit)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.check_every_n_steps is not None and self.monitor.endswith("_epoch"):
            raise Phi2TutorError(
                f"PhaseDetection: check_every_n_steps={self.check_every_n_steps} with "
                f"monitor='{self.monitor}' would read the same epoch value at every step check. Monitor a "
                "per-step metric (for example 'train/loss_step'), or set check_every_n_steps to None to "
                "check every epoch."
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_every_n_steps is None:
            self._check(trainer, pl_module, position=trainer.current_epoch + 1)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.check_every_n_steps is None:
            return
        step = trainer.global_step
        # With gradient accumulation several batches share a step; _check takes each position once.
        if step > 0 and step % self.check_every_n_steps == 0:
            self._check(trainer, pl_module, position=step)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, position: int) -> None:
        if self._tracker.positions and position <= self._tracker.positions[-1]:
            # Already checked: batches that share a step (gradient accumulation), or a restart that replays
            # a check the restored history holds.
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if not self._tracker.values:
                where = f"epoch {trainer.current_epoch + 1}" if self.unit == "epoch" else f"step {position}"
                raise Phi2TutorError(
                    f"PhaseDetection monitors '{self.monitor}', but no metric of that name was logged by "
                    f"{where}. Logged metrics: {_list_keys(metrics)}. Set PhaseDetection's monitor to one "
                    "of them ('train/loss_epoch' is the epoch mean of a 'train/loss' logged with "
                    "on_epoch=True)."
                )
            return
        # Rank 0's value for everyone: every process keeps the same history and so the same phase.
        value = trainer.strategy.broadcast(float(metrics[self.monitor].item()), src=0)
        checked_phase_index = self._tracker.phase_index
        transition = self._tracker.update(position, value)
        if self.unit == "epoch":
            # Logged with the epoch metrics, at the step of train/loss_epoch, and readable in callback_metrics.
            pl_module.log(PHASE_INDEX_KEY, float(checked_phase_index), on_step=False, on_epoch=True)
        else:
            # self.log from a batch hook would repeat the value at every later step; write it once, at the
            # step Lightning gives this batch's step metrics (as its LearningRateMonitor does).
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics({PHASE_INDEX_KEY: float(checked_phase_index)}, step=step)
        if transition is not None:
            message = self._describe(transition)
            rank_zero_info(message)
            log_text(trainer, TRANSITIONS_TEXT_TAG, message)

    def _describe(self, transition: PhaseTransition) -> str:
        previous_name = PHASE_NAMES[transition.phase_index - 1]
        previous_first = self._first_position_of(transition.phase_index - 1)
        if self.unit == "epoch":
            began, per = f"began at epoch {transition.boundary + 1}", "epoch"
        else:
            began, per = f"began after step {transition.boundary}", "check"
        moved = "fell" if self.mode == "min" else "rose"
        return (
            f"{transition.phase_name} {began}, {self.monitor} {transition.loss_at_boundary:.4f}: "
            f"{previous_name} lasted {self.unit}s {previous_first}-{transition.boundary}; over the last "
            f"{self.window} checks {self.monitor} {moved} "
            f"{rate_pct(transition.improvement_rate, self.mode):.2f}% per {per} (least-squares exponential), "
            f"a log-rate under {100 * transition.threshold:g}% of its fastest "
            f"({rate_pct(transition.peak_improvement_rate, self.mode):.2f}% per {per})."
        )

    def _first_position_of(self, phase_index: int) -> int:
        positions = self._tracker.positions
        if phase_index == 0:
            return positions[0]
        previous_boundary = self._tracker.boundaries[phase_index - 1]
        return positions[positions.index(previous_boundary) + 1]

    def state_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, **self._tracker.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("unit", "epoch") != self.unit:
            rank_zero_warn(
                f"PhaseDetection: the checkpoint's phase history counts {state_dict.get('unit')}s "
                f"but this run checks by {self.unit}; starting a new history."
            )
            return
        self._tracker.load_state_dict(state_dict)


def log_text(trainer: pl.Trainer, tag: str, text: str) -> None:
    """Write a text entry to every TensorBoard logger of the run (other loggers have no text panel)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, global_step=trainer.global_step)


def _list_keys(metrics: dict[str, Any]) -> str:
    return ", ".join(f"'{key}'" for key in sorted(metrics)) or "none"
