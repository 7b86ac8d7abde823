"""Resuming a killed run: a real ``phi2tutor fit`` process is SIGKILLed right after a mid-epoch checkpoint
and right after an epoch-end checkpoint (validation and MathAnswerEval on), resumed with ``--ckpt_path
last`` and with the checkpoint's path, and compared step by step with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from phi2tutor.cli import main
from phi2tutor.events import read_scalars
from phi2tutor.keys import ADAPTER_DIR, LOSS_STEP_KEY, REPORT_JSON, REPORT_MD, RUN_JSON
from tests.conftest import REPO, tiny_config, write_yaml

STEPS_PER_EPOCH = 3  # 48 examples, micro-batch 8, accumulation 2
MAX_EPOCHS = 3
CHECKPOINT_EVERY_N_STEPS = 2


class KillAfterCheckpoint(Callback):
    """Test-only: SIGKILLs its own process, as a crash or a reboot would, once a checkpoint is on disk.

    Args:
        step: kill at the start of the first batch after this optimizer step.
        epoch: kill at the start of this epoch (after the previous epoch's validation and checkpoint).
        flush: flush the loggers first, as TensorBoard's writer does every two minutes: the event file
            then holds steps after the last checkpoint, which the resumed run trains again.
    """

    def __init__(self, step: int | None = None, epoch: int | None = None, flush: bool = False) -> None:
        self.step = step
        self.epoch = epoch
        self.flush = flush

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step >= self.step:
            if self.flush:
                for logger in trainer.loggers:
                    logger.save()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.epoch is not None and trainer.current_epoch >= self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def resume_config(root: Path, *extra_callbacks: dict) -> dict:
    config = tiny_config(
        root, trainer={"max_epochs": MAX_EPOCHS, "accumulate_grad_batches": 2, "limit_val_batches": 1}
    )
    config["trainer"]["callbacks"] = [
        # As the shipped configs: every N optimizer steps, and at every epoch's end after validation.
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "every_n_train_steps": CHECKPOINT_EVERY_N_STEPS,
                "save_last": True,
                "enable_version_counter": False,  # one last.ckpt, the newest of both
            },
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/loss", "save_last": True, "enable_version_counter": False},
        },
        {
            "class_path": "callbacks.math_eval.MathAnswerEval",
            "init_args": {"num_problems": 4, "max_new_tokens": 4, "num_samples_logged": 0},
        },
        {"class_path": "callbacks.phases.PhaseDetection", "init_args": {"window": 2}},
        {"class_path": "callbacks.memory.GPUMemoryProfiler", "init_args": {"every_n_steps": 1}},
        {"class_path": "callbacks.report.TrainingReport", "init_args": {"figures": False}},
        *extra_callbacks,
    ]
    config["model"]["lr_schedule_epochs"] = MAX_EPOCHS
    return config


def fit_in_subprocess(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "phi2tutor.cli", "fit", "--config", str(config_path), *args],
        cwd=config_path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def killed_run(tmp_path: Path, name: str, **kill: int) -> Path:
    """A run killed by SIGKILL after a checkpoint; returns its config file (its logs lie beside it)."""
    root = tmp_path / name
    root.mkdir()
    killer = {"class_path": "tests.test_resume.KillAfterCheckpoint", "init_args": kill}
    config_path = write_yaml(root / "fit.yaml", resume_config(root, killer))
    result = fit_in_subprocess(config_path)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return config_path


def resume(config_path: Path, ckpt_path: str) -> Path:
    """Resume in this process (cheaper than a second interpreter) with the killed run's config minus the killer."""
    config = resume_config(config_path.parent)
    resumed_config = write_yaml(config_path.with_name("resume.yaml"), config)
    main(["fit", "--config", str(resumed_config), "--ckpt_path", ckpt_path])
    (run_dir,) = sorted((config_path.parent / "lightning_logs").glob("version_*"))
    return run_dir


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / ADAPTER_DIR / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    main(["fit", "--config", str(write_yaml(root / "fit.yaml", resume_config(root)))])
    (run_dir,) = sorted((root / "lightning_logs").glob("version_*"))
    return run_dir


# Logged values that measure the machine, not the training: they differ between any two runs.
MACHINE_TAGS = ("memory/", "budget/", "hparams/peak_memory_mb", "val/answer_eval_seconds")


def assert_same_training(resumed: Path, uninterrupted: Path) -> None:
    """Every logged series (losses, lr, grad norm, validation, answer accuracy, phases, the HParams
    summary) at the same steps with the same values, and the same final LoRA weights."""
    expected, got = read_scalars(uninterrupted), read_scalars(resumed)
    tags = {tag for tag in expected if not tag.startswith(MACHINE_TAGS)}
    assert LOSS_STEP_KEY in tags and "phase/index" in tags and "val/answer_accuracy" in tags
    assert tags == {tag for tag in got if not tag.startswith(MACHINE_TAGS)}
    for tag in sorted(tags):
        assert [step for step, _ in got[tag]] == [step for step, _ in expected[tag]], tag
        for (step, value), (_, reference) in zip(got[tag], expected[tag]):
            assert value == pytest.approx(reference, rel=1e-5, abs=1e-7), f"{tag} at step {step}"
    final, reference = lora_weights(resumed), lora_weights(uninterrupted)
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-5, atol=1e-7)


def test_mid_epoch_kill_resumed_with_last_matches_the_uninterrupted_run(tmp_path, uninterrupted) -> None:
    # Killed one optimizer step after the step-4 checkpoint (the first of epoch 2's 3 steps), with that
    # step's events on disk.
    checkpoint_step = 2 * CHECKPOINT_EVERY_N_STEPS
    config_path = killed_run(tmp_path, "mid", step=checkpoint_step + 1, flush=True)
    killed_dir = config_path.parent / "lightning_logs" / "version_0"
    saved = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == checkpoint_step and saved["epoch"] == 1
    killed_steps = [step for step, _ in read_scalars(killed_dir)[LOSS_STEP_KEY]]
    assert max(killed_steps) >= checkpoint_step  # logged after the checkpoint: trained again
    first_segment = (
        json.loads((killed_dir / RUN_JSON).read_text()) if (killed_dir / RUN_JSON).exists() else None
    )
    assert first_segment is None  # SIGKILL: no hook ran, no report

    run_dir = resume(config_path, "last")
    assert run_dir == killed_dir  # one run, one directory
    assert_same_training(run_dir, uninterrupted)
    run_info = json.loads((run_dir / RUN_JSON).read_text())
    assert len(run_info["segments"]) == 2
    total = sum(segment["duration_seconds"] for segment in run_info["segments"])
    assert run_info["duration_seconds"] == pytest.approx(total, abs=0.05)
    assert run_info["segments"][0]["duration_seconds"] > 0
    # The report's duration is the run's, both segments together.
    report = json.loads((run_dir / REPORT_JSON).read_text())
    assert report["general"]["duration_seconds"] == pytest.approx(total, abs=0.05)
    assert (run_dir / REPORT_MD).is_file()


def test_epoch_end_kill_resumed_with_the_path_matches_the_uninterrupted_run(tmp_path, uninterrupted) -> None:
    config_path = killed_run(tmp_path, "epoch", epoch=1)
    checkpoint = config_path.parent / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == STEPS_PER_EPOCH
    run_dir = resume(config_path, str(checkpoint))
    assert run_dir == checkpoint.parent.parent
    assert_same_training(run_dir, uninterrupted)


def test_resume_with_changed_model_options_stops_with_each_difference(
    tmp_path, uninterrupted, capsys
) -> None:
    root = tmp_path / "changed"
    shutil.copytree(uninterrupted.parent.parent, root)
    config_path = write_yaml(root / "fit.yaml", resume_config(root))
    with pytest.raises(SystemExit) as stopped:
        main(
            ["fit", "--config", str(config_path), "--ckpt_path", "last"]
            + ["--model.lora_r", "16", "--model.learning_rate", "0.05", "--trainer.max_epochs", "5"]
            + ["--trainer.limit_train_batches", "2"]
        )
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err[err.index("phi2tutor: error:") :]
    listed = [line.strip() for line in message.splitlines() if line.startswith("  ")]
    # max_epochs may change on resume: not an error
    assert listed == [
        "model.learning_rate: 0.003 in the checkpoint, 0.05 now",
        "model.lora_r: 4 in the checkpoint, 16 now",
        "trainer.limit_train_batches: None in the checkpoint, 2 now",
    ]
    assert "start a new run" in message


def test_resume_prints_each_permitted_change(tmp_path, uninterrupted) -> None:
    """max_epochs and a callback's threshold may change on resume: each change is printed, the run goes on."""
    import logging

    root = tmp_path / "permitted"
    shutil.copytree(uninterrupted.parent.parent, root)
    config = resume_config(root)
    phases = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PhaseDetection"))
    phases["init_args"]["window"] = 3
    config["trainer"]["max_epochs"] = MAX_EPOCHS + 1
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        main(["fit", "--config", str(write_yaml(root / "fit.yaml", config)), "--ckpt_path", "last"])
    finally:
        logger.removeHandler(handler)
    changes = [line for line in lines if line.startswith("phi2tutor | changed on resume:")]
    # (The run directory was copied: its root moved too.)
    assert changes == [
        "phi2tutor | changed on resume: trainer.callbacks: PhaseDetection.window: 2 in the checkpoint, 3 now",
        f"phi2tutor | changed on resume: trainer.default_root_dir: '{uninterrupted.parent.parent}' in the "
        f"checkpoint, '{root}' now",
        f"phi2tutor | changed on resume: trainer.max_epochs: {MAX_EPOCHS} in the checkpoint, {MAX_EPOCHS + 1} now",
    ]
    (run_dir,) = sorted((root / "lightning_logs").glob("version_*"))
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == (MAX_EPOCHS + 1) * STEPS_PER_EPOCH  # one more epoch trained


def test_last_without_any_checkpoint_names_where_it_looked(tmp_path, capsys) -> None:
    config_path = write_yaml(tmp_path / "fit.yaml", resume_config(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(config_path), "--ckpt_path", "last"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "lightning_logs") in err and "last.ckpt" in err


def test_last_without_last_ckpt_names_the_newest_checkpoint_there(tmp_path, capsys) -> None:
    """Killed between a step checkpoint and its last.ckpt copy: the message names the checkpoint to give."""
    config_path = write_yaml(tmp_path / "fit.yaml", resume_config(tmp_path))
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step=2.ckpt").write_bytes(b"older")
    os.utime(checkpoints / "step=2.ckpt", (1, 1))
    (checkpoints / "step=4.ckpt").write_bytes(b"newer")
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(config_path), "--ckpt_path", "last"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"no last.ckpt in {checkpoints}, but {checkpoints / 'step=4.ckpt'} is there" in err
    assert f"give it as --ckpt_path {checkpoints / 'step=4.ckpt'}, or leave out --ckpt_path" in err


class OutOfMemoryAtStep(Callback):
    """Test-only: a CUDA out-of-memory error in the training step after ``step`` optimizer steps.

    Args:
        step: the optimizer step count at which the error is raised.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.56 GiB.")


def fit_until_out_of_memory(
    tmp_path: Path, capsys, step: int, report_options: dict | None = None
) -> tuple[Path, str]:
    """fit that runs out of memory at ``step``: exit 1, one message and no traceback; (run dir, stderr)."""
    config = resume_config(
        tmp_path, {"class_path": "tests.test_resume.OutOfMemoryAtStep", "init_args": {"step": step}}
    )
    if report_options is not None:
        report_callback = next(
            c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("Report")
        )
        report_callback["init_args"] = report_options
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count(f"phi2tutor: error: CUDA ran out of memory at step {step}") == 1
    (run_dir,) = sorted((tmp_path / "lightning_logs").glob("version_*"))
    return run_dir, err


def test_out_of_memory_keeps_memory_json_run_json_report_and_last_checkpoint(tmp_path, capsys) -> None:
    run_dir, err = fit_until_out_of_memory(tmp_path, capsys, step=5)
    assert "Ways to fit:" in err and "Tried to allocate 1.56 GiB" in err
    memory = json.loads((run_dir / "memory.json").read_text())
    assert memory["oom"] is True
    run_info = json.loads((run_dir / RUN_JSON).read_text())
    assert run_info["stop"]["reason"] == "failed" and run_info["stop"]["exception"] == "OutOfMemoryError"
    assert (run_dir / REPORT_MD).is_file()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * CHECKPOINT_EVERY_N_STEPS  # the step-4 checkpoint, untouched


def test_out_of_memory_in_the_first_epoch_leaves_a_short_truthful_report(tmp_path, capsys) -> None:
    """Out of memory at step 2 of epoch 1's 3 (after the step-2 checkpoint), before any epoch is complete."""
    run_dir, _ = fit_until_out_of_memory(tmp_path, capsys, step=2)
    memory = json.loads((run_dir / "memory.json").read_text())
    assert memory["oom"] is True and (memory["oom_step"], memory["oom_epoch"]) == (2, 1)
    run_info = json.loads((run_dir / RUN_JSON).read_text())
    assert run_info["steps_per_epoch"] == STEPS_PER_EPOCH and run_info["global_step"] == 2
    assert run_info["epochs_run"] == 0 and run_info["stop"]["exception"] == "OutOfMemoryError"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == CHECKPOINT_EVERY_N_STEPS  # the step-2 checkpoint, intact
    report = json.loads((run_dir / REPORT_JSON).read_text())
    markdown = (run_dir / REPORT_MD).read_text()
    losses = read_scalars(run_dir)[LOSS_STEP_KEY]
    assert [step for step, _ in losses] == [0, 1]
    assert report["coverage"]["before_first_epoch"] is True
    assert (
        "This run stopped during epoch 1, before the epoch was complete: 2 of its 3 optimizer steps had "
        "finished and 2 training-loss points had been logged." in markdown
    )
    # The logged losses, placed as the share of epoch 1 they are (not its end).
    first, last_loss = report["loss"]["first"], report["loss"]["last"]
    assert (first["step"], first["epoch"], last_loss["step"], last_loss["epoch"]) == (0, 0.33, 1, 0.67)
    assert first["value"] == round(losses[0][1], 4) and last_loss["value"] == round(losses[-1][1], 4)
    assert f"- Last logged loss: {last_loss['value']} (step 1, epoch 0.67)" in markdown
    assert "### Epoch means" not in markdown
    # Why it stopped: out of memory at step 2, the peak, the planner's estimate and its ways to fit.
    oom = report["memory"]["out_of_memory_at"]
    assert (oom["step"], oom["epoch"]) == (2, 1)
    assert oom["estimated_peak_mb"] == memory["estimate"]["estimated_peak_mb"]
    assert "It ran out of memory at step 2 (epoch 1), with 2 optimizer steps finished." in markdown
    assert f"Peak: {report['memory']['peak_mb']} MB" in markdown
    assert f"The memory planner estimated {oom['estimated_peak_mb']} MB" in markdown
    assert "- It failed with OutOfMemoryError during epoch 1" in markdown
    recommendation = report["recommendations"][0]
    assert recommendation["kind"] == "out_of_memory"
    assert [way["kind"] for way in recommendation["ways_to_fit"]] == [
        "micro_batch",
        "max_length",
        "gradient_checkpointing",
        "nf4",
        "paged_optimizer",
    ]
    assert "lower data.batch_size (now 8)" in markdown and "lower data.max_length (now 128)" in markdown
    # Two learning-rate steps, the second the highest: a rise, not a schedule the records cannot show.
    assert report["learning_rate"]["shape"] == "warmup_rising"
    assert "then constant" not in markdown
    from tests.test_report import numbers_in, numbers_of_json

    assert not numbers_in(markdown) - numbers_of_json(report)


def test_out_of_memory_in_the_first_step_still_writes_the_report(tmp_path, capsys) -> None:
    """Nothing logged yet (out of memory in step 0, before any checkpoint): the report says so, in Spanish."""
    run_dir, _ = fit_until_out_of_memory(
        tmp_path, capsys, step=0, report_options={"language": "es", "figures": True}
    )
    assert not (run_dir / "checkpoints").exists()  # none written before step 0: none to lose
    assert json.loads((run_dir / "memory.json").read_text())["oom_step"] == 0
    report = json.loads((run_dir / REPORT_JSON).read_text())
    markdown = (run_dir / REPORT_MD).read_text()
    assert report["loss"] is None and report["phases"] is None and report["general"]["final_loss"] is None
    assert report["general"]["optimizer_steps"] == 0
    assert (
        "Este entrenamiento se detuvo durante la época 1, antes de completarla: habían terminado 0 de sus 3 "
        "pasos del optimizador y se habían registrado 0 puntos de la pérdida de entrenamiento." in markdown
    )
    assert "- No se registró ninguna pérdida de entrenamiento" in markdown
    assert "## Fases del aprendizaje" not in markdown
    assert "Se quedó sin memoria en el paso 0 (época 1), con 0 pasos del optimizador terminados." in markdown
    assert (
        "baja data.batch_size (ahora 8)" in markdown and "pon model.gradient_checkpointing: true" in markdown
    )
    assert "loss.png" not in markdown and report["figures"] == {}  # no loss, no step logged: nothing to draw
    from tests.test_report import numbers_in, numbers_of_json

    assert not numbers_in(markdown) - numbers_of_json(report)


def test_a_time_interval_checkpoint_with_accumulation_gets_a_notice(tmp_path, lightning_messages) -> None:
    """Lightning checks train_time_interval after every micro-batch: with accumulation the checkpoint can hold
    half a step, which no resume can repeat exactly, so fit says so instead of promising an exact resume."""
    config = tiny_config(tmp_path, trainer={"max_steps": 1, "accumulate_grad_batches": 2})
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"train_time_interval": "0:10:00", "save_last": True},
        }
    ]
    main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])

    # (A set: the records reach the fixture's handler both on Lightning's logger and through the root's.)
    notices = {
        r.getMessage() for r in lightning_messages.records if r.getMessage().startswith("phi2tutor | notice")
    }
    assert notices == {
        "phi2tutor | notice: ModelCheckpoint(train_time_interval=0:10:00) can save between the 2 micro-batches "
        "of one optimizer step (trainer.accumulate_grad_batches 2), and a checkpoint holds no accumulated "
        "gradients: a run resumed from such a checkpoint trains that step on fewer micro-batches, not exactly as "
        "uninterrupted. every_n_train_steps saves only after complete optimizer steps."
    }
