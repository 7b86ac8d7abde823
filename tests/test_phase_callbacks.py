"""PhaseDetection and PlateauStopping driven by the real Trainer on scripted metric series.

A LightningModule logs a loss (and optionally an accuracy) read from a script, so every transition and
stop epoch the callbacks produce can be compared with what the rule in phi2tutor.phases predicts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.phases import PhaseDetection
from callbacks.plateau import PlateauStopping
from phi2tutor.errors import Phi2TutorError
from phi2tutor.phases import PHASE_NAMES, detect_phases, is_plateau, phase_index_of
from tests.reference_run import reference_loss_series


class ScriptedRun(LightningModule):
    """Logs ``train/loss`` from a script: by epoch (``epoch_losses``) or by optimizer step (``step_losses``)."""

    def __init__(
        self,
        epoch_losses: list[float] | None = None,
        step_losses: list[float] | None = None,
        batches_per_epoch: int = 1,
    ) -> None:
        super().__init__()
        self.epoch_losses = epoch_losses
        self.step_losses = step_losses
        self.batches_per_epoch = batches_per_epoch
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.training_steps_run = 0

    def training_step(self, batch, batch_idx):
        self.training_steps_run += 1
        if self.step_losses is not None:
            value = self.step_losses[self.global_step]
        else:
            value = self.epoch_losses[self.current_epoch]
        self.log("train/loss", value, on_step=True, on_epoch=True)
        # A zero-gradient loss: the optimizer steps (global_step advances) but nothing learns.
        return self.weight.sum() * 0.0 + value

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(self.batches_per_epoch, 1)), batch_size=1)


class ScriptedRunWithAccuracy(ScriptedRun):
    """Also validates, logging ``val/answer_accuracy`` from a script by epoch."""

    def __init__(self, epoch_losses: list[float], accuracies: list[float]) -> None:
        super().__init__(epoch_losses=epoch_losses)
        self.accuracies = accuracies

    def validation_step(self, batch, batch_idx):
        self.log("val/answer_accuracy", self.accuracies[self.current_epoch])

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def make_trainer(tmp_path: Path, callbacks: list, max_epochs: int, **options) -> Trainer:
    options.setdefault("enable_checkpointing", False)
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path, name="run", default_hp_metric=False),
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def as_logged(values: list[float]) -> list[float]:
    """The values as the callbacks see them: Lightning logs float32."""
    return [float(np.float32(value)) for value in values]


def predicted_stop(
    values: list[float],
    window: int,
    min_rel_improvement: float,
    min_epochs: int = 0,
    stabilization_from: int | None = None,
    mode: str = "min",
) -> int | None:
    """The epoch the plateau rule stops in; ``stabilization_from``: first epoch of stabilization, if required."""
    for epoch in range(1, len(values) + 1):
        if (
            epoch >= min_epochs
            and (stabilization_from is None or epoch >= stabilization_from)
            and is_plateau(values[:epoch], window, min_rel_improvement, mode)
        ):
            return epoch
    return None


def read_events(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[str]]]:
    """Scalars ((step, value) in step order) and text entries of a TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = {
        tag: sorted((event.step, event.value) for event in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["scalars"]
    }
    texts = {
        tag.removesuffix("/text_summary"): [
            event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(tag)
        ]
        for tag in accumulator.Tags()["tensors"]
    }
    return scalars, texts


def test_reference_run_phases_and_stop_through_the_trainer(tmp_path, lightning_messages):
    losses = as_logged(reference_loss_series())
    expected = detect_phases(losses)
    assert expected.boundaries == (50, 101)
    stop = predicted_stop(losses, 10, 0.01, stabilization_from=expected.boundaries[1] + 1)
    assert stop == 145
    phases = PhaseDetection()
    plateau = PlateauStopping(window=10, min_rel_improvement=0.01, require_stabilization=True)
    # Listed before PhaseDetection on purpose: Lightning runs EarlyStopping subclasses after the others.
    trainer = make_trainer(tmp_path, [plateau, phases], max_epochs=250)

    trainer.fit(ScriptedRun(epoch_losses=losses))

    assert plateau.stopped_at_epoch == stop
    assert trainer.current_epoch == stop
    assert phases.positions == list(range(1, stop + 1))
    assert [t.boundary for t in phases.transitions] == [50, 101]
    assert phases.current_phase == "stabilization" and phases.current_phase_index == 2
    assert phases.analysis() == detect_phases(losses[:stop])
    assert plateau.checked_epochs == list(range(1, stop + 1))
    assert round(100 * plateau.last_relative_improvement, 2) == 0.97

    scalars, texts = read_events(Path(trainer.logger.log_dir))
    assert [value for _, value in scalars["phase/index"]] == [
        phase_index_of(e, (50, 101)) for e in range(1, stop + 1)
    ]
    assert [value for _, value in scalars["train/loss_epoch"]] == pytest.approx(losses[:stop])
    # Same steps as the loss they describe, so the report can pair them.
    assert [step for step, _ in scalars["phase/index"]] == [step for step, _ in scalars["train/loss_epoch"]]
    transitions = texts["phase/transitions"]
    assert len(transitions) == 2
    assert transitions[0].startswith("fine-tuning began at epoch 51, train/loss_epoch 0.1035: ")
    assert "rapid learning lasted epochs 1-50" in transitions[0]
    assert transitions[1].startswith(f"stabilization began at epoch 102, train/loss_epoch {losses[100]:.4f}")
    assert texts["plateau/stop"] == [
        "PlateauStopping stopped the run at epoch 145: train/loss_epoch improved 0.97% over the last 10 "
        "checks (epochs 136-145), under min_rel_improvement=1%, in the stabilization phase. Best "
        f"train/loss_epoch {losses[144]:.4f} at epoch 145."
    ]
    printed = lightning_messages.text
    assert transitions[0] in printed and transitions[1] in printed and texts["plateau/stop"][0] in printed


@pytest.mark.parametrize(("min_epochs", "stop_epoch"), [(0, 14), (30, 30)])
def test_stopping_waits_for_min_epochs(tmp_path, min_epochs, stop_epoch):
    # Falls 10% an epoch for 8 epochs, then 0.05% an epoch: a plateau as soon as the window leaves the fall.
    losses = as_logged([0.9**epoch if epoch < 8 else 0.9**8 * 0.9995 ** (epoch - 8) for epoch in range(60)])
    assert predicted_stop(losses, 6, 0.01, min_epochs) == stop_epoch
    plateau = PlateauStopping(window=6, min_rel_improvement=0.01, min_epochs=min_epochs)
    trainer = make_trainer(tmp_path, [plateau], max_epochs=60)

    trainer.fit(ScriptedRun(epoch_losses=losses))

    assert plateau.stopped_at_epoch == stop_epoch
    assert trainer.current_epoch == stop_epoch
    assert "train/loss_epoch improved 0.2" in plateau.stopping_reason_message


def short_run_losses() -> list[float]:
    return as_logged([0.05 + 2.0 * math.exp(-epoch / 3) + 0.3 * math.exp(-epoch / 10) for epoch in range(80)])


def short_run_callbacks() -> tuple[PhaseDetection, PlateauStopping]:
    return (
        PhaseDetection(window=5),
        PlateauStopping(window=5, min_rel_improvement=0.01, require_stabilization=True),
    )


@pytest.mark.parametrize("resume_after_epoch", [30, 55], ids=["in-fine-tuning", "window-from-the-end"])
def test_resuming_keeps_the_phase_and_the_window(tmp_path, resume_after_epoch):
    losses = short_run_losses()
    boundaries = detect_phases(losses, window=5).boundaries
    stop = predicted_stop(losses, 5, 0.01, stabilization_from=boundaries[1] + 1)
    assert (boundaries, stop) == ((19, 39), 58)
    # 30: resumed in fine-tuning, before stabilization is found. 55: resumed in stabilization, fewer than
    # `window` epochs before the stop, which a restarted (empty) history could not reach in time.
    assert boundaries[0] < 30 < boundaries[1] < 55 and stop - 55 < 5

    phases, plateau = short_run_callbacks()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    first = make_trainer(
        tmp_path, [phases, plateau, checkpoints], resume_after_epoch, enable_checkpointing=True
    )
    first.fit(ScriptedRun(epoch_losses=losses))
    assert plateau.stopped_at_epoch is None
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[phases.state_key]["positions"] == list(range(1, resume_after_epoch + 1))
    assert saved[plateau.state_key]["checked_epochs"] == list(range(1, resume_after_epoch + 1))

    phases, plateau = short_run_callbacks()
    resumed = make_trainer(tmp_path, [phases, plateau], max_epochs=80)
    resumed.fit(ScriptedRun(epoch_losses=losses), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")

    assert [t.boundary for t in phases.transitions] == list(boundaries)
    assert phases.positions == list(range(1, stop + 1))
    assert plateau.checked_epochs == list(range(1, stop + 1))
    assert plateau.stopped_at_epoch == stop
    assert resumed.current_epoch == stop


def test_accuracy_plateau_at_validation_end_keeps_the_best_checkpoint(tmp_path):
    accuracies = as_logged(
        [0.10, 0.30, 0.50, 0.60, 0.66, 0.69, 0.700, 0.712, 0.705, 0.709, 0.706, 0.708, 0.707, 0.709]
        + [0.71] * 20
    )
    stop = predicted_stop(accuracies, 4, 0.01, mode="max")
    assert stop == 10
    plateau = PlateauStopping(monitor="val/answer_accuracy", mode="max", window=4, min_rel_improvement=0.01)
    best = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", monitor="val/answer_accuracy", mode="max", filename="best-{epoch}"
    )
    latest = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="latest")
    trainer = make_trainer(tmp_path, [plateau, best, latest], max_epochs=30, enable_checkpointing=True)

    trainer.fit(ScriptedRunWithAccuracy(epoch_losses=[1.0] * 30, accuracies=accuracies))

    assert plateau._check_on_train_epoch_end is False  # checked after validation
    assert plateau.stopped_at_epoch == stop
    assert trainer.current_epoch == stop
    assert best.best_model_score.item() == pytest.approx(0.712)
    assert Path(best.best_model_path).name == "best-epoch=7.ckpt"  # epoch 8, 0-based in the name
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == [
        "best-epoch=7.ckpt",
        "latest.ckpt",
    ]
    state = torch.load(tmp_path / "checkpoints" / "latest.ckpt", weights_only=False)["callbacks"][
        plateau.state_key
    ]
    assert state["stopped_epoch"] == stop - 1
    assert state["stopping_reason_message"].startswith(
        "PlateauStopping stopped the run at epoch 10: val/answer_accuracy improved"
    )
    assert state["stopping_reason_message"].endswith("Best val/answer_accuracy 0.7120 at epoch 8.")
    assert state["checked_values"] == pytest.approx(accuracies[:stop])


def test_phase_detection_every_n_steps(tmp_path):
    step_losses = as_logged(
        [0.05 + 3.0 * math.exp(-step / 8) + 0.2 * math.exp(-step / 40) for step in range(120)]
    )
    phases = PhaseDetection(monitor="train/loss_step", window=5, check_every_n_steps=2)
    trainer = make_trainer(tmp_path, [phases], max_epochs=6)

    trainer.fit(ScriptedRun(step_losses=step_losses, batches_per_epoch=20))

    checked_steps = list(range(2, 121, 2))
    # The value checked after optimizer step s was logged by the training step that made it, step s - 1.
    expected = detect_phases(
        [step_losses[s - 1] for s in checked_steps], checked_steps, window=5, unit="step"
    )
    assert phases.positions == checked_steps
    assert [t.boundary for t in phases.transitions] == list(expected.boundaries) == [44, 106]
    assert phases.analysis() == expected
    scalars, _ = read_events(Path(trainer.logger.log_dir))
    assert [value for _, value in scalars["phase/index"]] == [
        phase_index_of(s, expected.boundaries) for s in checked_steps
    ]
    # Each at the step of the train/loss_step it was read from.
    loss_steps = dict(scalars["train/loss_step"])
    assert [loss_steps[step] for step, _ in scalars["phase/index"]] == pytest.approx(
        [step_losses[s - 1] for s in checked_steps]
    )


@pytest.mark.parametrize(
    ("make_callback", "message"),
    [
        (lambda: PlateauStopping(window=1), r"PlateauStopping: window=1 is out of range.*integer >= 2"),
        (
            lambda: PlateauStopping(min_rel_improvement=1.5),
            r"min_rel_improvement=1.5 is out of range.*at least 0 and below 1",
        ),
        (lambda: PlateauStopping(min_rel_improvement=-0.01), r"min_rel_improvement=-0.01 is out of range"),
        (lambda: PlateauStopping(min_epochs=-1), r"min_epochs=-1 is out of range.*integer >= 0"),
        (lambda: PlateauStopping(mode="sideways"), r"PlateauStopping: mode='sideways' is not valid"),
        (lambda: PlateauStopping(monitor=""), r"monitor='' is not a metric name"),
        (lambda: PhaseDetection(window=1), r"PhaseDetection: window=1 is out of range"),
        (
            lambda: PhaseDetection(fine_tuning_below=0.0),
            r"PhaseDetection: fine_tuning_below=0.0 is out of range",
        ),
        (
            lambda: PhaseDetection(fine_tuning_below=0.1, stabilization_below=0.2),
            r"stabilization_below=0.2 must be smaller than fine_tuning_below=0.1",
        ),
        (lambda: PhaseDetection(check_every_n_steps=0), r"check_every_n_steps=0 is out of range"),
    ],
)
def test_bad_arguments_fail_at_construction(make_callback, message):
    with pytest.raises(Phi2TutorError, match=message):
        make_callback()


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (
            PlateauStopping(monitor="train/los_epoch"),
            r"PlateauStopping monitors 'train/los_epoch', but no metric of that name was logged by its first "
            r"check \(epoch 1\)\. Logged metrics: 'train/loss', 'train/loss_epoch', 'train/loss_step'\.",
        ),
        (
            PhaseDetection(monitor="val/loss"),
            r"PhaseDetection monitors 'val/loss', but no metric of that name was logged by epoch 1\. "
            r"Logged metrics: 'train/loss', 'train/loss_epoch', 'train/loss_step'\.",
        ),
    ],
)
def test_a_monitor_never_logged_fails_at_the_first_check(tmp_path, callback, message):
    module = ScriptedRun(epoch_losses=[1.0] * 5)

    with pytest.raises(Phi2TutorError, match=message):
        make_trainer(tmp_path, [callback], max_epochs=5).fit(module)
    assert module.training_steps_run == 1


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        (
            [PlateauStopping(require_stabilization=True)],
            r"require_stabilization=True .* no PhaseDetection callback",
        ),
        (
            [PlateauStopping(monitor="val/answer_accuracy", mode="max")],
            r"checks 'val/answer_accuracy' after validation",
        ),
        (
            [PhaseDetection(check_every_n_steps=10)],
            r"check_every_n_steps=10 with monitor='train/loss_epoch' would read the same epoch value",
        ),
    ],
)
def test_inconsistent_setups_fail_before_training(tmp_path, callbacks, message):
    module = ScriptedRun(epoch_losses=[1.0] * 5)

    with pytest.raises(Phi2TutorError, match=message):
        make_trainer(tmp_path, callbacks, max_epochs=5).fit(module)
    assert module.training_steps_run == 0


def test_phase_names_are_the_projects():
    assert PHASE_NAMES == ("rapid learning", "fine-tuning", "stabilization")
