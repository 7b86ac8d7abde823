"""PhaseAwareLR through the real Trainer on a scripted loss: the rapid-learning phase ends at a known epoch,
the learning rate logged by LearningRateMonitor then follows the shortened cosine exactly, and a run resumed
from a checkpoint after the change logs the same rates. ShortenableSchedule on its own below.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.dashboard import TensorBoardDashboard
from callbacks.phase_lr import PhaseAwareLR
from callbacks.phases import PhaseDetection
from callbacks.report import TrainingReport
from phi2tutor.errors import Phi2TutorError
from phi2tutor.events import read_scalars, read_texts
from phi2tutor.keys import LR_KEY, LR_SCHEDULE_TEXT_TAG, LR_SHORTENED_MARKER, REPORT_MD, RUN_JSON
from phi2tutor.model import warmup_cosine_schedule
from phi2tutor.phases import detect_phases
from phi2tutor.schedule import ShortenableSchedule
from tests.test_phase_callbacks import ScriptedRun, as_logged

PEAK_LR = 0.01
FLOOR = 0.01  # min_lr_ratio
WARMUP_STEPS = 4
STEPS_PER_EPOCH = 4
MAX_EPOCHS = 20
TOTAL_STEPS = STEPS_PER_EPOCH * MAX_EPOCHS
WINDOW = 3
# A steady fall of 0.1 an epoch for 8 epochs, then 0.001 an epoch: the rapid phase ends just after the bend.
LOSSES = as_logged([2.0 - 0.1 * e if e < 8 else 1.3 - 0.001 * (e - 7) for e in range(MAX_EPOCHS)])
RAPID_LEARNING_LAST_EPOCH = 10


class ScriptedScheduleRun(ScriptedRun):
    """The scripted loss, with TutorModule's warmup + cosine schedule over the whole run, stepped per step."""

    def __init__(self) -> None:
        super().__init__(epoch_losses=LOSSES, batches_per_epoch=STEPS_PER_EPOCH)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=PEAK_LR)
        scheduler = warmup_cosine_schedule(optimizer, WARMUP_STEPS, TOTAL_STEPS, FLOOR)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": LR_KEY},
        }


def base_factor(step: int) -> float:
    """transformers' linear warmup + cosine to the floor, written out."""
    if step < WARMUP_STEPS:
        return step / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS)
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def shortened_factor(step: int, at_step: int, decay_steps: int) -> float:
    if step < at_step:
        return base_factor(step)
    progress = min(step - at_step, decay_steps) / decay_steps
    return FLOOR + (base_factor(at_step) - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def make_trainer(root: Path, callbacks: list, name: str = "run", **options) -> Trainer:
    options.setdefault("enable_checkpointing", False)
    return Trainer(
        default_root_dir=root,
        max_epochs=MAX_EPOCHS,
        callbacks=[*callbacks, LearningRateMonitor(logging_interval="step")],
        logger=TensorBoardLogger(root, name=name, default_hp_metric=False),
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def logged_lrs(trainer: Trainer) -> list[tuple[int, float]]:
    return read_scalars(trainer.logger.log_dir)[LR_KEY]


def schedule_texts(trainer: Trainer) -> list[str]:
    texts = read_texts(trainer.logger.log_dir)
    return [
        text for tag, entries in texts.items() if tag.startswith(LR_SCHEDULE_TEXT_TAG) for _, text in entries
    ]


def test_the_scripted_rapid_phase_ends_where_the_rule_says() -> None:
    assert detect_phases(LOSSES, window=WINDOW).boundaries[0] == RAPID_LEARNING_LAST_EPOCH


@pytest.mark.parametrize("phase_lr_first", [False, True], ids=["after_phase_detection", "before_it"])
def test_the_rate_follows_the_shortened_cosine_after_rapid_learning(tmp_path, phase_lr_first) -> None:
    phases = PhaseDetection(window=WINDOW)
    phase_lr = PhaseAwareLR(decay_epochs=2)
    callbacks = [phase_lr, phases] if phase_lr_first else [phases, phase_lr]
    trainer = make_trainer(tmp_path, [*callbacks, TensorBoardDashboard()])

    trainer.fit(ScriptedScheduleRun())

    assert [t.boundary for t in phases.transitions][:1] == [RAPID_LEARNING_LAST_EPOCH]
    at_step = RAPID_LEARNING_LAST_EPOCH * STEPS_PER_EPOCH  # 40: the steps of epochs 1-10
    assert phase_lr.shortened_at_step == at_step
    assert phase_lr.decay_steps == 2 * STEPS_PER_EPOCH
    assert phase_lr.ends_at_step == 48
    assert phase_lr.steps_left_before == TOTAL_STEPS - at_step
    lrs = logged_lrs(trainer)
    assert [step for step, _ in lrs] == list(range(TOTAL_STEPS))
    expected = [PEAK_LR * shortened_factor(step, at_step, 8) for step in range(TOTAL_STEPS)]
    assert [lr for _, lr in lrs] == pytest.approx(as_logged(expected), rel=1e-6, abs=0)
    # Concretely: unchanged up to the change, the floor two epochs later instead of at the end of the run.
    assert lrs[at_step][1] == pytest.approx(PEAK_LR * base_factor(at_step), rel=1e-6)
    assert lrs[at_step + 4][1] == pytest.approx(PEAK_LR * (FLOOR + (base_factor(40) - FLOOR) / 2), rel=1e-6)
    assert [lr for _, lr in lrs[48:]] == pytest.approx([PEAK_LR * FLOOR] * 32, rel=1e-6)
    assert lrs[47][1] > PEAK_LR * FLOOR

    assert schedule_texts(trainer) == [
        "PhaseAwareLR: rapid learning ended at epoch 10 (PhaseDetection on train/loss_epoch); from optimizer "
        f"step 40 the learning rate decays from {PEAK_LR * base_factor(40):.3g} to its floor 0.0001 over 8 "
        "optimizer steps (2 epochs), to step 48, instead of the 40 optimizer steps (10 epochs) the schedule "
        "had left."
    ]
    assert read_scalars(trainer.logger.log_dir)[LR_SHORTENED_MARKER] == [
        (40, pytest.approx(PEAK_LR * base_factor(40), rel=1e-6))
    ]


def test_decay_fraction_takes_its_share_of_the_steps_left(tmp_path) -> None:
    phase_lr = PhaseAwareLR()  # decay_fraction 0.5 of the 40 steps left
    trainer = make_trainer(tmp_path, [PhaseDetection(window=WINDOW), phase_lr])

    trainer.fit(ScriptedScheduleRun())

    assert (phase_lr.shortened_at_step, phase_lr.decay_steps) == (40, 20)
    expected = [PEAK_LR * shortened_factor(step, 40, 20) for step in range(TOTAL_STEPS)]
    assert [lr for _, lr in logged_lrs(trainer)] == pytest.approx(as_logged(expected), rel=1e-6, abs=0)


def test_a_decay_no_shorter_than_the_schedule_leaves_it_as_it_is(tmp_path) -> None:
    phase_lr = PhaseAwareLR(decay_epochs=12)  # 48 steps; the schedule has 40 left
    trainer = make_trainer(tmp_path, [PhaseDetection(window=WINDOW), phase_lr])

    trainer.fit(ScriptedScheduleRun())

    assert phase_lr.decided_at_step == 40 and phase_lr.shortened_at_step is None
    expected = [PEAK_LR * base_factor(step) for step in range(TOTAL_STEPS)]
    assert [lr for _, lr in logged_lrs(trainer)] == pytest.approx(as_logged(expected), rel=1e-6, abs=0)
    assert schedule_texts(trainer) == [
        "PhaseAwareLR: rapid learning ended at epoch 10 (PhaseDetection on train/loss_epoch); the schedule "
        "already reaches its floor 0.0001 in 40 optimizer steps (10 epochs), no later than decay_epochs=12 "
        "(48 steps): left as it is."
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[tuple[int, float]]]:
    """A whole run that checkpoints every epoch: its directory and its logged rates."""
    root = tmp_path_factory.mktemp("uninterrupted")
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(
        root,
        [PhaseDetection(window=WINDOW), PhaseAwareLR(decay_epochs=2), checkpoints],
        enable_checkpointing=True,
    )
    trainer.fit(ScriptedScheduleRun())
    return root, logged_lrs(trainer)


@pytest.mark.parametrize(
    ("epoch", "with_callback"),
    [(10, True), (11, True), (11, False)],
    ids=["at_the_change", "after_it", "after_it_without_the_callback"],
)
def test_a_resumed_run_logs_the_same_rates(tmp_path, uninterrupted, epoch, with_callback) -> None:
    root, expected = uninterrupted
    checkpoint = root / "checkpoints" / f"epoch={epoch - 1}.ckpt"  # saved at the end of 1-based `epoch`
    saved = torch.load(checkpoint, weights_only=True)  # what the CLI's resume checks load
    assert saved["lr_schedulers"][0]["lr_lambdas"][0]["tail_start_step"] == 40
    phase_lr = PhaseAwareLR(decay_epochs=2)
    callbacks = [PhaseDetection(window=WINDOW), *([phase_lr] if with_callback else [])]
    trainer = make_trainer(tmp_path, callbacks, name="resumed")

    trainer.fit(ScriptedScheduleRun(), ckpt_path=checkpoint)

    resumed = logged_lrs(trainer)
    first_step = epoch * STEPS_PER_EPOCH
    assert resumed[0][0] == first_step
    assert resumed == [(step, pytest.approx(lr, rel=1e-7)) for step, lr in expected[first_step:]]
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert (factor.tail_start_step, factor.tail_steps) == (40, 8)
    if with_callback:
        assert (phase_lr.shortened_at_step, phase_lr.decay_steps) == (40, 8)
        assert phase_lr.message.startswith("PhaseAwareLR: rapid learning ended at epoch 10")


def test_it_needs_phase_detection_and_the_tutor_schedule(tmp_path) -> None:
    with pytest.raises(Phi2TutorError, match="the Trainer has no PhaseDetection callback"):
        make_trainer(tmp_path, [PhaseAwareLR()]).fit(ScriptedScheduleRun())
    with pytest.raises(Phi2TutorError, match=r"returned other schedulers \(none\)"):
        make_trainer(tmp_path, [PhaseDetection(window=WINDOW), PhaseAwareLR()]).fit(
            ScriptedRun(epoch_losses=LOSSES)
        )
    two = [PhaseDetection(window=WINDOW), PhaseDetection(monitor="train/loss_step", check_every_n_steps=2)]
    with pytest.raises(Phi2TutorError, match="Set phase_monitor to the one to follow"):
        make_trainer(tmp_path, [*two, PhaseAwareLR()]).fit(ScriptedScheduleRun())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decay_epochs": 2, "decay_fraction": 0.5}, "are both given"),
        ({"decay_epochs": 0}, "decay_epochs=0 is out of range"),
        ({"decay_fraction": 1.0}, "decay_fraction=1.0 is out of range"),
        ({"decay_fraction": True}, "decay_fraction=True is out of range"),
    ],
)
def test_bad_options_name_themselves(options, message) -> None:
    with pytest.raises(Phi2TutorError, match=message):
        PhaseAwareLR(**options)


def test_shortenable_schedule_keeps_only_numbers_in_the_scheduler_state(tmp_path) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine_schedule(optimizer, 10, 100, 0.1)
    factor = scheduler.lr_lambdas[0]
    assert isinstance(factor, ShortenableSchedule)
    assert factor(150) == pytest.approx(0.1)  # held at the floor past the schedule
    factor.shorten(30, 20)
    assert factor(30) == pytest.approx(factor.base_factor(30))  # no jump
    assert factor(40) == pytest.approx(0.1 + (factor.base_factor(30) - 0.1) / 2)
    assert factor(50) == factor(99) == pytest.approx(0.1)
    assert factor.steps_to_floor(45) == 5
    with pytest.raises(ValueError, match="already shortened at step 30"):
        factor.shorten(40, 5)
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    state = torch.load(tmp_path / "scheduler.pt", weights_only=True)
    assert state["lr_lambdas"] == [
        {
            "tail_start_step": 30,
            "tail_steps": 20,
            "tail_start_factor": factor.base_factor(30),
            "tail_end_factor": 0.1,
        }
    ]
    fresh = warmup_cosine_schedule(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, 100, 0.1
    )
    fresh.load_state_dict(state)
    assert [fresh.lr_lambdas[0](s) for s in range(120)] == [factor(s) for s in range(120)]


def fit_with_report(
    root: Path, phase_lr: PhaseAwareLR, language: str = "en", window: int = WINDOW
) -> tuple[dict, str]:
    """The scripted run with the training report: (run.json, report.md)."""
    trainer = make_trainer(
        root, [PhaseDetection(window=window), phase_lr, TrainingReport(language=language, figures=False)]
    )
    trainer.fit(ScriptedScheduleRun())
    run_dir = Path(trainer.logger.log_dir)
    return json.loads((run_dir / RUN_JSON).read_text()), (run_dir / REPORT_MD).read_text()


@pytest.mark.parametrize(
    ("language", "line"),
    [
        (
            "en",
            "- PhaseAwareLR shortened it when rapid learning ended: from optimizer step 40 (after 10 epochs) the "
            "rate fell from {start} to its floor 0.0001 over 8 optimizer steps (2 epochs), to step 48, instead of "
            "the 40 optimizer steps (10 epochs) the schedule had left; the first logged train/lr at the floor is at "
            "step 48.",
        ),
        (
            "es",
            "- PhaseAwareLR lo acortó al terminar el aprendizaje rápido: desde el paso del optimizador 40 (tras 10 "
            "épocas) la tasa bajó de {start} a su mínimo 0.0001 en 8 pasos del optimizador (2 épocas), hasta el "
            "paso 48, en lugar de los 40 pasos del optimizador (10 épocas) que le quedaban al programa; el primer "
            "train/lr registrado en el mínimo está en el paso 48.",
        ),
    ],
)
def test_the_training_report_says_how_the_schedule_was_shortened(tmp_path, language, line) -> None:
    run_info, report = fit_with_report(tmp_path, PhaseAwareLR(decay_epochs=2), language)

    recorded = run_info["phase_aware_lr"]

    start = PEAK_LR * base_factor(40)
    assert recorded["outcome"] == "shortened"
    assert (recorded["shortened_at_step"], recorded["decay_steps"], recorded["ends_at_step"]) == (40, 8, 48)
    assert recorded["start_lr"] == pytest.approx(start) and recorded["floor_lr"] == pytest.approx(1e-4)
    assert run_info["steps_per_epoch"] == STEPS_PER_EPOCH  # the report's epochs below come from it
    section = report.split("## Learning rate" if language == "en" else "## Learning rate (tasa")[1].split(
        "\n## "
    )[0]
    assert line.format(start=f"{start:.4g}") in section.splitlines()


def test_the_training_report_says_when_the_schedule_was_left_or_never_changed(tmp_path) -> None:
    _, left = fit_with_report(tmp_path / "left", PhaseAwareLR(decay_epochs=12))
    assert (
        "- PhaseAwareLR: rapid learning ended at optimizer step 40 (after 10 epochs); the schedule already reached "
        "its floor 0.0001 in 40 optimizer steps (10 epochs), no later than the decay asked for: left as it was."
    ) in left.splitlines()

    never = PhaseAwareLR(decay_epochs=2)
    run_info, report = fit_with_report(
        tmp_path / "never", never, window=MAX_EPOCHS + 1
    )  # a window never filled
    assert never.outcome == run_info["phase_aware_lr"]["outcome"] == "not_reached"
    assert (
        "- PhaseAwareLR was on, but PhaseDetection did not report the end of rapid learning: the schedule ran as "
        "configured."
    ) in report.splitlines()
