"""The training report: from a tiny fit through the real CLI, and from a trainer_state.json shaped like the
reference run; every number of report.md in report.json, both languages, sections left out with a note."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Callback

from phi2tutor.cli import main
from phi2tutor.memory import estimate_settings, max_micro_batch_that_fits, plan_from_config_dict
from phi2tutor.report import NUMBER_PATTERN, RunRecords, build_report, render_markdown, write_report
from tests.conftest import tiny_config, write_yaml
from tests.data.reference_trainer_state import write_reference_run

SECTIONS_EN = (
    "## General information",
    "## Memory",
    "## Learning phases",
    "## Gradient norm",
    "## Learning rate",
    "## Validation",
    "### Answer accuracy",
    "## Why the run stopped",
    "## Figures",
    "## Recommendations",
)
SECTIONS_ES = (
    "## Información general",
    "## Memoria",
    "## Fases del aprendizaje",
    "## Norma del gradiente",
    "## Learning rate",
    "## Validación",
    "### Aciertos de la respuesta final",
    "## Por qué terminó el entrenamiento",
    "## Figuras",
    "## Recomendaciones",
)


def run_dir_of(root: Path) -> Path:
    return sorted((root / "lightning_logs").glob("version_*"))[-1]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> Path:
    """A tiny fit through the CLI with the report, the phase, answer and memory callbacks."""
    root = tmp_path_factory.mktemp("report_fit")
    config = tiny_config(root, trainer={"max_epochs": 3})
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.report.TrainingReport"},
        {"class_path": "callbacks.phases.PhaseDetection", "init_args": {"window": 2}},
        {
            "class_path": "callbacks.math_eval.MathAnswerEval",
            "init_args": {"num_problems": 4, "max_new_tokens": 8, "num_samples_logged": 0},
        },
        {"class_path": "callbacks.memory.GPUMemoryProfiler", "init_args": {"every_n_steps": 1}},
    ]
    main(["fit", "--config", str(write_yaml(root / "fit.yaml", config))])
    return run_dir_of(root)


def numbers_in(text: str) -> set[float]:
    text = re.sub(r"(?<=\d)[, ](?=\d{3}\b)", "", text)  # thousands separators
    return {float(match) for match in NUMBER_PATTERN.findall(text)}


def numbers_of_json(value) -> set[float]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, (int, float)):
        return {float(value)}
    if isinstance(value, str):
        return numbers_in(value)
    items = value.values() if isinstance(value, dict) else value
    return set().union(*(numbers_of_json(item) for item in items)) if items else set()


def assert_png_not_blank(path: Path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.var(pixels[..., :3])) > 1e-3, f"{path} is blank"


# ------------------------------------------------------------------------------------------- tiny fit
def test_fit_writes_report_with_every_section_and_json_numbers(reported_run: Path) -> None:
    markdown = (reported_run / "report.md").read_text()
    report = json.loads((reported_run / "report.json").read_text())
    for heading in SECTIONS_EN:
        assert heading in markdown, heading
    missing = numbers_in(markdown) - numbers_of_json(report)
    assert not missing, f"numbers in report.md that report.json lacks: {sorted(missing)}"
    general = report["general"]
    last = report["loss"]["last"]
    assert f"- Last logged loss: {last['value']} (step {last['step']}, epoch {last['epoch']:g})" in markdown
    assert general["final_loss"] == last["value"]
    assert "### Epoch means (complete epochs)" in markdown
    assert general["epochs_run"] == 3 and general["optimizer_steps"] == 18
    assert general["total_parameters"] > general["trainable_parameters"] > 0
    assert report["stop"]["reason"] == "max_epochs"
    assert report["memory"]["device"] == "cpu" and report["memory"]["peak_mb"] > 0
    assert report["validation"]["answer_accuracy"]["evaluations"] >= 3
    assert report["phases"]["method"] == "detected" and report["phases"]["options"]["window"] == 2


def test_fit_report_numbers_come_from_the_event_files_and_run_json(reported_run: Path) -> None:
    from phi2tutor.events import read_scalars

    scalars = read_scalars(reported_run)
    report = json.loads((reported_run / "report.json").read_text())
    epoch_losses = [value for _, value in scalars["train/loss_epoch"]]
    step_losses = scalars["train/loss"]
    # Every optimizer step is logged (log_every_n_steps 1) and the 3 epochs have as many steps each: the
    # k-th step of epoch e (1-based k) lies at epoch e - 1 + k / steps_per_epoch.
    steps_per_epoch = len(step_losses) // 3
    first_step = step_losses[0][0]
    first_epoch = first_step // steps_per_epoch + (first_step % steps_per_epoch + 1) / steps_per_epoch
    assert report["loss"]["first"] == {
        "value": round(step_losses[0][1], 4),
        "step": first_step,
        "epoch": round(first_epoch, 2),
    }
    last_step = step_losses[-1][0]
    assert report["loss"]["last"]["epoch"] == round(
        last_step // steps_per_epoch + (last_step % steps_per_epoch + 1) / steps_per_epoch, 2
    )
    assert report["general"]["final_loss"] == round(step_losses[-1][1], 4)
    assert [row["loss"] for row in report["loss"]["epoch_means"]] == [round(v, 4) for v in epoch_losses]
    # The phases are judged on the epoch means, the series PhaseDetection follows.
    assert report["phases"]["series"] == "epoch_mean" and report["phases"]["end_loss"] == round(
        epoch_losses[-1], 4
    )
    grad_norms = [value for _, value in scalars["train/grad_norm"]]
    assert report["grad_norm"]["peak"] == round(max(grad_norms), 4)
    assert report["learning_rate"]["peak"] == pytest.approx(0.003)
    assert report["learning_rate"]["shape"] == "warmup_cosine"
    run_info = json.loads((reported_run / "run.json").read_text())
    assert run_info["hardware"]["kind"] == "cpu" and run_info["hardware"]["cores"] >= 1
    assert run_info["total_parameters"] == report["general"]["total_parameters"]
    # The same phase rule online and offline: the callback's boundaries are the report's.
    assert run_info["phase_detection"]["boundaries"] == report["phases"]["boundaries"]


def test_fit_report_figures_open_and_are_not_blank(reported_run: Path) -> None:
    report = json.loads((reported_run / "report.json").read_text())
    assert set(report["figures"]) == {"loss", "grad_norm_lr", "memory", "answer_accuracy"}
    for filename in report["figures"].values():
        assert_png_not_blank(reported_run / filename)


def test_report_command_on_run_in_spanish_with_json(reported_run: Path, tmp_path: Path, capsys) -> None:
    main(["report", str(reported_run), "--language", "es", "--output", str(tmp_path), "--json"])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "report.json").read_text())
    assert printed == written and printed["language"] == "es"
    markdown = (tmp_path / "report.md").read_text()
    for heading in SECTIONS_ES:
        assert heading in markdown, heading
    assert f"- Última pérdida registrada: {written['general']['final_loss']} (paso" in markdown
    assert "Llegó a max_epochs (3)." in markdown
    assert (tmp_path / "loss.png").is_file()


def test_run_json_and_accuracy_section_say_whether_the_calculator_was_on(
    reported_run: Path, tmp_path: Path
) -> None:
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    from phi2tutor.events import read_scalars
    from phi2tutor.keys import ACCURACY_KEY, CALCULATOR_CALLS_KEY, CALCULATOR_CHANGED_KEY

    # The tiny fit has no annotations: its answers were decoded without the calculator, and it says so.
    run_info = json.loads((reported_run / "run.json").read_text())
    assert run_info["calculator"] == {"enabled": False, "annotated_training_data": False}
    report = json.loads((reported_run / "report.json").read_text())
    assert report["validation"]["answer_accuracy"]["calculator"] == {
        "enabled": False,
        "annotated_training_data": False,
        "last_calls": None,
        "last_changed": None,
        "last_epoch": None,
    }
    markdown = (reported_run / "report.md").read_text()
    assert "- Calculator: off (the answers are the model's own tokens)\n" in markdown
    # The same run as a calculator run: run.json says on, MathAnswerEval's counts are in the events.
    run = tmp_path / "version_0"
    shutil.copytree(reported_run, run)
    run_info["calculator"] = {"enabled": True, "annotated_training_data": True}
    (run / "run.json").write_text(json.dumps(run_info))
    last_step = read_scalars(run)[ACCURACY_KEY][-1][0]
    writer = SummaryWriter(log_dir=str(run))
    writer.add_scalar(CALCULATOR_CALLS_KEY, 7.0, 0)
    writer.add_scalar(CALCULATOR_CALLS_KEY, 11.0, last_step)
    writer.add_scalar(CALCULATOR_CHANGED_KEY, 4.0, last_step)
    writer.close()
    expected = {
        "en": "- Calculator: on (each `<<expression=` the tutor wrote was completed by phi2tutor.calculator); at "
        "the last evaluation (epoch 3) it completed 11 annotations, 4 of which changed the model's own tokens\n",
        "es": "- Calculadora: activada (phi2tutor.calculator completó cada `<<expresión=` que escribió el tutor); "
        "en la última evaluación (época 3) completó 11 anotaciones, 4 de ellas cambiaron los tokens del propio "
        "modelo\n",
    }
    for language, line in expected.items():
        report = write_report(run, tmp_path / language, language=language, draw_figures=False)
        accuracy = report["validation"]["answer_accuracy"]
        assert accuracy["last_epoch"] == 3
        assert accuracy["calculator"] == {
            "enabled": True,
            "annotated_training_data": True,
            "last_calls": 11,
            "last_changed": 4,
            "last_epoch": 3,
        }
        markdown = (tmp_path / language / "report.md").read_text()
        assert line in markdown
        assert not numbers_in(markdown) - numbers_of_json(report)
    # A run without run.json's record (an older run, or `phi2tutor report` of another tool's directory): the
    # logged counts alone show the calculator was on.
    del run_info["calculator"]
    (run / "run.json").write_text(json.dumps(run_info))
    report = write_report(run, tmp_path / "inferred", draw_figures=False)
    assert report["validation"]["answer_accuracy"]["calculator"]["enabled"] is True
    assert report["validation"]["answer_accuracy"]["calculator"]["annotated_training_data"] is None


# ------------------------------------------------------------------------------ the reference run's shape
@pytest.mark.parametrize(
    ("language", "expected"),
    [
        (
            "en",
            (
                "Improvement within the phase: 96.04%",
                "Improvement within the phase: 37.78%",
                "Improvement within the phase: 11.49%",
                "Total loss reduction: 97.82% (from 2.6141 at epoch 1 to 0.057 at epoch 250)",
                "Share of the total loss reduction: 98.18%",
                "- Last logged loss: 0.057 (step 5000, epoch 250)",
                "| Mean loss reported by the Trainer (train_loss) | 0.2402 |",
                "| Duration | 1 day, 8 hours, 33 minutes (1953.67 minutes) |",
                "| Max allocated | 3087.42 | 75.38 |",
                "Peak: 2.988 at epoch 25",
                "### Phase 3: stabilization (epochs 101-250)",
            ),
        ),
        (
            "es",
            (
                "Mejora dentro de la fase: 96.04%",
                "Mejora dentro de la fase: 37.78%",
                "Mejora dentro de la fase: 11.49%",
                "Reducción total de la pérdida: 97.82% (de 2.6141 en la época 1 a 0.057 en la época 250)",
                "Parte de la reducción total de la pérdida: 98.18%",
                "- Última pérdida registrada: 0.057 (paso 5000, época 250)",
                "| Pérdida media según el Trainer (train_loss) | 0.2402 |",
                "| Duración | 1 día, 8 horas, 33 minutos (1953.67 minutos) |",
                "| Máxima asignada | 3087.42 | 75.38 |",
                "Máximo: 2.988 en la época 25",
                "### Fase 3: estabilización (épocas 101-250)",
            ),
        ),
    ],
)
def test_reference_trainer_state_gives_the_reference_numbers(tmp_path: Path, language: str, expected) -> None:
    state = write_reference_run(tmp_path / "reference")
    out = tmp_path / "out"
    main(
        [
            "report",
            str(state),
            "--language",
            language,
            "--output",
            str(out),
            "--phase_boundaries",
            "50",
            "100",
        ]
    )
    markdown = (out / "report.md").read_text()
    for text in expected:
        assert text in markdown, text
    report = json.loads((out / "report.json").read_text())
    phases = report["phases"]["phases"]
    assert [p["improvement_pct"] for p in phases] == [96.04, 37.78, 11.49]
    assert [p["share_of_total_reduction_pct"] for p in phases] == [98.18, 1.53, 0.29]
    assert report["phases"]["total_reduction_pct"] == 97.82
    assert report["general"]["final_loss"] == 0.057
    assert report["general"]["mean_loss"] != report["general"]["final_loss"]
    assert report["learning_rate"]["peak"] == 0.0001 and report["learning_rate"]["shape"] == "warmup_cosine"
    assert report["grad_norm"]["peak"] == 2.988 and report["grad_norm"]["peak_epoch"] == 25
    assert report["stop"]["reason"] == "max_steps"  # the Trainer finishes by reaching max_steps
    assert [r["kind"] for r in report["recommendations"]][0] == "max_epochs"
    if language == "en":
        assert not numbers_in(markdown) - numbers_of_json(report)
    for filename in report["figures"].values():
        assert_png_not_blank(out / filename)


def test_reference_phases_detected_by_the_callbacks_rule(tmp_path: Path) -> None:
    # Without given boundaries the report applies PhaseDetection's rule (calibrated to 50 and 101).
    report = write_report(write_reference_run(tmp_path, with_memory=False), draw_figures=False)
    assert report["phases"]["method"] == "detected"
    assert report["phases"]["boundaries"] == [50, 101]
    assert report["phases"]["phases"][0]["improvement_pct"] == 96.04
    assert report["memory"] is None and {"key": "no_memory_state"} in report["notes"]


# --------------------------------------------------------------------------- missing parts and errors
class InterruptInSecondEpoch(Callback):
    """Presses Ctrl+C in the middle of the second epoch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise KeyboardInterrupt


def test_interrupted_run_without_memory_or_validation_gets_report_with_notes(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, trainer={"max_epochs": 3, "limit_val_batches": 0})
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.report.TrainingReport"},
        {"class_path": "tests.test_report.InterruptInSecondEpoch"},
    ]
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl+C exits with 1
            main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl+C after the first
    run_dir = run_dir_of(tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    markdown = (run_dir / "report.md").read_text()
    assert report["stop"]["reason"] == "interrupted" and report["stop"]["exception"] == "KeyboardInterrupt"
    assert "It was interrupted (KeyboardInterrupt) during epoch 2" in markdown
    assert report["general"]["complete_epochs"] == 1 and report["coverage"]["partial"]
    assert "This report covers the run up to step" in markdown
    assert report["memory"] is None and report["validation"] is None
    assert "## Memory" not in markdown and "## Validation" not in markdown
    assert "No memory.json: the memory section is left out." in markdown
    assert "No validation was logged" in markdown


def test_directory_without_event_files_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"{tmp_path} holds no TensorBoard event files" in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"log_history": [{"loss": 1.0, "epoch": 1.0}', "is not valid JSON (line 1, column"),
        ('{"global_step": 3}', "has no 'log_history' list"),
        ('{"log_history": [{"loss": "high", "epoch": 1.0}]}', "entry 0 has loss='high', not a number"),
        ('{"log_history": [{"eval_loss": 1.0, "epoch": 1.0}]}', "logs no training loss"),
    ],
)
def test_malformed_trainer_state_is_a_clear_error(tmp_path: Path, capsys, content: str, message: str) -> None:
    path = tmp_path / "trainer_state.json"
    path.write_text(content)
    with pytest.raises(SystemExit):
        main(["report", str(path)])
    error = capsys.readouterr().err
    assert str(path) in error and message in error and "Traceback" not in error


def test_memory_headroom_recommends_the_planners_larger_micro_batch() -> None:
    config = tiny_config(Path("/tmp"))
    records = RunRecords(
        source="memory-test",
        source_kind="phi2tutor-run",
        run_name="memory-test",
        epoch_losses=[(1, 2.0), (2, 1.5)],
        memory={
            "device": "GPU",
            "budget_mb": 400.0,
            "allocated_mb": 300.0,
            "reserved_mb": 340.0,
            "max_allocated_mb": 320.0,
        },
        config=config,
    )
    report = build_report(records)
    estimate = plan_from_config_dict(config)
    largest = max_micro_batch_that_fits(estimate.model, 400.0, limit=256, **estimate_settings(estimate))
    assert report["memory"]["planner"]["max_micro_batch"] == largest
    assert report["memory"]["peak_percent_of_budget"] == 80.0 and report["memory"]["headroom_mb"] == 80.0
    assert largest > 8  # the tiny model's estimate leaves room at a 400 MB budget
    recommendation = next(r for r in report["recommendations"] if r["kind"] == "larger_micro_batch")
    assert recommendation["micro_batch"] == 8 and recommendation["max_micro_batch"] == largest
    markdown = render_markdown(report, "en")
    assert f"a micro-batch (data.batch_size) of up to {largest} fits, now 8" in markdown
    assert "## Validation" not in markdown and "No validation was logged" in markdown


def test_chance_tolerance_setting_decides_the_named_chance_level() -> None:
    import math

    from phi2tutor.report import ReportSettings

    level = 1.008 * math.log(4)  # flat, 0.8% above ln 4
    records = RunRecords(
        source="chance-test",
        source_kind="phi2tutor-run",
        run_name="chance-test",
        epoch_losses=[(epoch, level) for epoch in range(1, 21)],
    )
    assert build_report(records)["phases"]["chance_classes"] == 4
    strict = ReportSettings(chance_tolerance_pct=0.5)
    report = build_report(records, settings=strict)
    assert report["phases"]["verdict"] == "flat" and report["phases"]["chance_classes"] is None


def test_counts_of_one_are_singular_in_both_languages(tmp_path: Path) -> None:
    # 7 flat losses (a tenth of them is 1 point), the last one alone in a partial second epoch, one
    # evaluation without improvement (patience 1), a run of 60 seconds.
    losses = [1.10, 1.09, 1.11, 1.10, 1.09, 1.10, 1.11]
    log = [{"epoch": 0.15 * step, "loss": loss, "step": step} for step, loss in enumerate(losses, start=1)]
    log[-1]["epoch"] = 1.05
    log += [
        {"epoch": 0.6, "eval_loss": 1.05, "step": 4},
        {"epoch": 1.05, "eval_loss": 1.07, "step": 7},
        {"epoch": 1.05, "step": 7, "train_loss": 1.1, "train_runtime": 60.0},
    ]
    state = {
        "best_global_step": 4,
        "best_metric": 1.05,
        "epoch": 1.05,
        "global_step": 7,
        "max_steps": 100,
        "num_train_epochs": 15,
        "log_history": log,
        "stateful_callbacks": {
            "EarlyStoppingCallback": {
                "args": {"early_stopping_patience": 1, "early_stopping_threshold": 0.0},
                "attributes": {"early_stopping_patience_counter": 1},
            },
            "TrainerControl": {"args": {"should_training_stop": True}, "attributes": {}},
        },
    }
    path = tmp_path / "one" / "trainer_state.json"
    path.parent.mkdir()
    path.write_text(json.dumps(state))
    report = write_report(path, tmp_path / "en", draw_figures=False)
    assert report["loss"]["trend"]["kind"] == "flat" and report["loss"]["trend"]["edge_points"] == 1
    assert report["stop"]["metric"] == "eval_loss"
    english = (tmp_path / "en" / "report.md").read_text()
    for text in (
        "1.05 of 15: 1 complete, the last (2) partial",
        "(1 logged point)",
        "(its first point: 1.1;",
        "1 evaluation without improvement of eval_loss",
        "| Duration | 1 minute (1 minute) |",
    ):
        assert text in english, text
    write_report(path, tmp_path / "es", language="es", draw_figures=False)
    spanish = (tmp_path / "es" / "report.md").read_text()
    for text in (
        "1.05 de 15: 1 completa, la última (2) parcial",
        "(1 punto registrado)",
        "(su primer punto: 1.1;",
        "1 evaluación sin mejora de eval_loss",
        "| Duración | 1 minuto (1 minuto) |",
        "| Precisión | desconocida |",
        "| Parámetros (contados en el modelo) | desconocidos |",
    ):
        assert text in spanish, text
    for wrong in (
        r"\b1 (points|evaluations|minutes|epochs)\b",
        r"primeros 1\b",
        r"últimos 1\b",
        r"\b1 (puntos|evaluaciones|minutos|completas)\b",
    ):
        assert not re.search(wrong, english + spanish), wrong


@pytest.mark.parametrize(
    ("language", "calls", "changed", "expected"),
    [
        ("en", 1, 1, "it completed 1 annotation, 1 of which changed the model's own tokens"),
        ("en", 12, 5, "it completed 12 annotations, 5 of which changed the model's own tokens"),
        ("es", 1, 1, "completó 1 anotación, 1 de ellas cambió los tokens del propio modelo"),
        ("es", 3, 1, "completó 3 anotaciones, 1 de ellas cambió los tokens del propio modelo"),
        ("es", 3, 2, "completó 3 anotaciones, 2 de ellas cambiaron los tokens del propio modelo"),
    ],
)
def test_calculator_line_counts_in_singular_and_plural(language, calls, changed, expected) -> None:
    from phi2tutor.report.text import TEXT, _render_calculator, fmt

    calculator = {"enabled": True, "last_calls": calls, "last_changed": changed, "last_epoch": 2}
    (line,) = _render_calculator(calculator, TEXT[language], lambda value: fmt(value, language))
    assert line.endswith(expected)
