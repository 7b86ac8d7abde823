"""The report on phi2tutor runs through the real Trainer, with a LightningModule whose losses are scripted:
a flat loss, a noisy flat loss, a validation loss that rises while the training loss falls, a NaN step."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.phases import PhaseDetection
from callbacks.report import TrainingReport
from phi2tutor.events import read_scalars
from phi2tutor.keys import GRAD_NORM_KEY, LOSS_EPOCH_KEY, LOSS_STEP_KEY, VAL_LOSS_KEY
from phi2tutor.report import write_report

STEPS_PER_EPOCH = 8
EPOCHS = 6


class ScriptedLoss(pl.LightningModule):
    """Logs train/loss and val/loss from a script instead of a model: ``train(step)``, ``val(epoch)``."""

    def __init__(self, train, val) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_loss, self.val_loss = train, val

    def training_step(self, batch, batch_idx):
        value = self.train_loss(self.global_step)
        loss = self.weight.sum() * 0 + torch.tensor(value, dtype=torch.float32)
        self.log(LOSS_STEP_KEY, loss, on_step=True, on_epoch=False)  # as TutorModule logs them
        self.log(LOSS_EPOCH_KEY, loss, on_step=False, on_epoch=True)
        self.log(GRAD_NORM_KEY, value if not math.isfinite(value) else 1.0, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log(VAL_LOSS_KEY, torch.tensor(self.val_loss(self.current_epoch), dtype=torch.float32))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(STEPS_PER_EPOCH, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def run(tmp_path, train, val, callbacks=(), log_every_n_steps=1):
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        logger=TensorBoardLogger(tmp_path, name="", version="scripted"),
        callbacks=[*callbacks, TrainingReport(figures=False)],
        log_every_n_steps=log_every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(ScriptedLoss(train, val))
    run_dir = tmp_path / "scripted"
    text = (run_dir / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda token: pytest.fail(f"report.json holds {token}"))
    return report, (run_dir / "report.md").read_text()


NOISE = np.random.default_rng(0).standard_normal(EPOCHS * STEPS_PER_EPOCH)


def test_flat_loss_is_no_learning(tmp_path):
    report, markdown = run(tmp_path, lambda step: math.log(4), lambda epoch: math.log(4))
    assert report["loss"]["first"]["value"] == report["loss"]["last"]["value"] == round(math.log(4), 4)
    assert report["phases"]["verdict"] == "flat" and report["phases"]["chance_classes"] == 4
    assert "1.3863 is ln 4" in markdown
    assert [r["kind"] for r in report["recommendations"]] == ["no_learning"]
    assert "model.learning_rate" in markdown


def test_noisy_flat_loss_has_no_phases(tmp_path):
    report, _ = run(tmp_path, lambda step: 2.0 * (1 + 0.03 * NOISE[step]), lambda epoch: 2.0)
    assert report["phases"]["verdict"] == "flat" and report["phases"]["phases"] == []
    first_step, first_value = read_scalars(tmp_path / "scripted")[LOSS_STEP_KEY][0]
    assert report["loss"]["first"] == {"value": round(first_value, 4), "step": first_step, "epoch": 0.12}


def test_rising_validation_loss_is_overfitting_with_the_checkpoint_to_keep(tmp_path):
    report, markdown = run(
        tmp_path, lambda step: 2.0 * math.exp(-step / 10), lambda epoch: [1.0, 0.8, 0.7, 0.9, 1.1, 1.3][epoch]
    )
    overfitting = report["validation"]["val_loss"]["overfitting"]
    assert (overfitting["from_epoch"], overfitting["best"], overfitting["last"]) == (3, 0.7, 1.3)
    assert overfitting["rise_pct"] == pytest.approx(85.71)
    assert "ModelCheckpoint(monitor='val/loss', mode='min')" in markdown
    assert "Train for longer" not in markdown and "load_best_model_at_end" not in markdown


def test_nan_step_is_named_and_report_json_is_strict(tmp_path):
    report, markdown = run(tmp_path, lambda step: math.nan if step == 20 else 1.0 / (1 + step), lambda e: 1.0)
    assert report["nonfinite"]["series"]["loss"]["first_step"] == 20
    assert report["recommendations"][0]["kind"] == "nonfinite"
    assert "The training loss is NaN from step 20" in markdown and "trainer.gradient_clip_val" in markdown


def test_phases_of_a_per_step_phase_detection_are_judged_on_what_it_checked(tmp_path):
    """PhaseDetection on train/loss at every optimizer step, train/loss logged every 4th: the report judges the
    checked values (run.json), so its boundaries are the run's own, not the rule on 6 epoch means or on a
    quarter of the points."""
    detector = PhaseDetection(monitor=LOSS_STEP_KEY, check_every_n_steps=1, window=8)
    fast_then_slow = [
        (3.0 * math.exp(-0.2 * step) if step < 16 else 3.0 * math.exp(-3.2 - 0.005 * (step - 16)))
        * (1 + 0.002 * NOISE[step])
        for step in range(EPOCHS * STEPS_PER_EPOCH)
    ]
    report, markdown = run(
        tmp_path, lambda step: fast_then_slow[step], lambda epoch: 1.0, [detector], log_every_n_steps=4
    )

    online = [transition.boundary for transition in detector.transitions]
    assert online and online[0] in range(16, 26)  # rapid learning ends after the bend at step 16
    run_info = json.loads((tmp_path / "scripted" / "run.json").read_text())
    checks = run_info["phase_detection"]["checks"]
    assert [position for position, _ in checks] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    phases = report["phases"]
    assert (phases["series"], phases["unit"], phases["monitor"]) == ("checked", "step", LOSS_STEP_KEY)
    assert phases["boundaries"] == phases["online_boundaries"] == online
    assert not [note for note in report["notes"] if note["key"] == "online_phases_differ"]
    assert (
        "Phases looked for on the values of train/loss that PhaseDetection checked during training (at every "
        "optimizer step; run.json keeps them) by phi2tutor.phases"
    ) in markdown
    assert "over a window of 8 checks" in markdown
    write_report(tmp_path / "scripted", tmp_path / "es", language="es", draw_figures=False)
    assert (
        "Fases buscadas sobre los valores de train/loss que PhaseDetection comprobó durante el entrenamiento (en "
        "cada paso del optimizador; run.json los guarda) con phi2tutor.phases"
    ) in (tmp_path / "es" / "report.md").read_text()


def test_a_nan_checked_by_a_per_step_phase_detection_keeps_run_json_strict(tmp_path):
    detector = PhaseDetection(monitor=LOSS_STEP_KEY, check_every_n_steps=1, window=8)
    report, _ = run(
        tmp_path,
        lambda step: math.nan if step == 30 else 3.0 * math.exp(-0.05 * step),
        lambda epoch: 1.0,
        [detector],
    )

    text = (tmp_path / "scripted" / "run.json").read_text()
    checks = json.loads(text, parse_constant=lambda token: pytest.fail(f"run.json holds {token}"))[
        "phase_detection"
    ]["checks"]
    assert checks[30] == [31, None]  # the loss of the 31st step, checked after it
    assert report["phases"]["series"] == "checked" and report["phases"]["points"] == EPOCHS * STEPS_PER_EPOCH
