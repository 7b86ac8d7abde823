"""The report on real trainer_state.json files of public training runs (tests/data/trainer_states/,
SOURCES.md): every fact it states is checked against the file itself, computed here from the JSON."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from phi2tutor.report import write_report
from tests.test_report import numbers_in, numbers_of_json

CORPUS = Path(__file__).parent / "data" / "trainer_states"
FILES = sorted(CORPUS.glob("*.json"))


def strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def early_stopping_state(state: dict) -> tuple[int, int] | None:
    """(patience, patience counter) of the state's EarlyStoppingCallback, or None without one."""
    stopping = (state.get("stateful_callbacks") or {}).get("EarlyStoppingCallback")
    if not stopping:
        return None
    patience = stopping["args"]["early_stopping_patience"]
    return patience, stopping["attributes"]["early_stopping_patience_counter"]


def expected_stop(state: dict) -> str:
    control = ((state.get("stateful_callbacks") or {}).get("TrainerControl") or {}).get("args") or {}
    if state["global_step"] >= state["max_steps"]:
        return "max_steps"
    if control.get("should_training_stop") is False:
        return "checkpoint"
    stopping = early_stopping_state(state)
    if stopping and stopping[1] >= stopping[0]:
        return "early_stopping"
    return "ended_before_max_steps" if "stateful_callbacks" not in state else "stopped"


def expected_best_metric(state: dict) -> str | None:
    """The eval metric whose value at best_global_step is best_metric: the one early stopping watched."""
    names = {
        key
        for entry in state["log_history"]
        if entry.get("step") == state.get("best_global_step")
        for key, value in entry.items()
        if key.startswith("eval_") and value == state.get("best_metric")
    }
    return names.pop() if len(names) == 1 else None


def expected_overfitting(state: dict) -> bool:
    """The validation loss ends more than 5% above its best while the training loss fell after the best."""
    evals = [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e]
    if len(evals) < 2:
        return False
    best_step, best = min(evals, key=lambda item: item[1])
    last_step, last = evals[-1]
    if last_step == best_step or last <= best * 1.05:
        return False
    train = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    before_best = [loss for step, loss in train if step <= best_step]
    return bool(before_best) and train[-1][1] < before_best[-1]


def test_the_corpus_holds_at_least_ten_real_files_with_their_sources() -> None:
    sources = (CORPUS / "SOURCES.md").read_text()
    assert len(FILES) >= 10
    for path in FILES:
        assert f"`{path.name}`" in sources, path.name
    assert len(re.findall(r"\b[0-9a-f]{40}\b", sources)) >= len(FILES)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_report_states_the_files_own_facts(path: Path, tmp_path: Path) -> None:
    state = json.loads(path.read_text())
    losses = [e for e in state["log_history"] if "loss" in e and "epoch" in e]
    report = write_report(
        path,
        tmp_path,
        draw_figures=path.stem in ("overfitting_ner_eval_rising", "t5_three_epochs_many_steps"),
    )
    written = strict_json(tmp_path / "report.json")
    assert written["loss"] == report["loss"]
    loss = report["loss"]
    first, last = losses[0]["loss"], losses[-1]["loss"]
    assert loss["first"]["value"] == pytest.approx(first, rel=2e-3, abs=1e-4)
    assert loss["first"]["step"] == losses[0]["step"]
    assert loss["last"]["value"] == pytest.approx(last, rel=2e-3, abs=1e-4)
    assert loss["last"]["step"] == losses[-1]["step"]
    if first:
        assert loss["reduction_pct"] == pytest.approx(100 * (first - last) / first, abs=0.01)
    assert report["stop"]["reason"] == expected_stop(state)
    # The state of a run still going (or that may be) covers it up to its step; a finished or stopped run whole.
    assert report["coverage"]["partial"] == (expected_stop(state) in ("checkpoint", "ended_before_max_steps"))
    if expected_stop(state) == "early_stopping":
        patience, counter = early_stopping_state(state)
        stop = report["stop"]
        assert (stop["patience"], stop["patience_counter"]) == (patience, counter)
        assert stop["metric"] == expected_best_metric(state) is not None
        assert stop["best_step"] == state["best_global_step"]
        assert stop["best_metric"] == pytest.approx(state["best_metric"], rel=1e-3)
        assert round(stop["epoch"], 2) == round(state["epoch"], 2)
    val = (report["validation"] or {}).get("val_loss") or {}
    assert bool(val.get("overfitting")) == expected_overfitting(state)
    phases = report["phases"]
    # A Trainer run has no PhaseDetection options: the window is a tenth of its points, between 3 and 15.
    window = max(3, min(15, len({e["step"] for e in losses}) // 10))
    assert phases["options"]["window"] == window and phases["window_from"] == "length"
    if len(losses) < window:
        assert phases["verdict"] != "phases" and phases["phases"] == []
    if phases["verdict"] == "phases":
        # Phases of learning only where the loss fell: the median of the last tenth is below the first
        # logged loss or the median of the first tenth.
        head = sorted(e["loss"] for e in losses[: len(losses) // 10])
        tail = sorted(e["loss"] for e in losses[-(len(losses) // 10) :])
        assert tail[len(tail) // 2] < max(losses[0]["loss"], head[len(head) // 2])
    if loss["trend"]["kind"] == "flat":  # "no learning": the first logged loss is not far above the end
        assert losses[0]["loss"] < 2 * loss["trend"]["tail"]
    for phase in phases["phases"]:
        share = phase["share_of_total_reduction_pct"]
        assert share is None or 0 <= share <= 100
    epochs_run = state["epoch"]
    partial = loss["partial_epoch"]
    assert (partial is not None) == (abs(epochs_run - round(epochs_run)) > 1e-6 and epochs_run % 1 > 1e-6)
    markdown = (tmp_path / "report.md").read_text()
    assert "unknown%" not in markdown and not re.search(r"\bnan\b|\binf\b", markdown)  # Python's float words
    missing = numbers_in(markdown) - numbers_of_json(report)
    assert not missing, f"numbers in report.md that report.json lacks: {sorted(missing)}"
    recommendation_text = markdown.split("## Recommendations")[1]
    assert "GPUMemoryProfiler" not in markdown and "data.batch_size" not in recommendation_text
    if "eval_accuracy" in json.dumps(state):
        assert "Answer accuracy" not in markdown


def test_flat_loss_at_chance_is_no_learning_not_phases(tmp_path: Path) -> None:
    report = write_report(CORPUS / "one_epoch_noisy_falcon_lora.json", tmp_path, draw_figures=False)
    assert report["phases"]["verdict"] == "flat" and report["phases"]["phases"] == []
    assert [r["kind"] for r in report["recommendations"]] == ["no_learning"]
    assert "No learning: the loss stayed at" in (tmp_path / "report.md").read_text()


def test_early_stopped_run_names_its_patience_metric_and_the_rise_of_eval_loss(tmp_path: Path) -> None:
    state = json.loads((CORPUS / "early_stopped_whisper_wer.json").read_text())
    evals = [(e["step"], e["eval_loss"]) for e in state["log_history"] if "eval_loss" in e]
    best_step, best = min(evals, key=lambda item: item[1])
    report = write_report(CORPUS / "early_stopped_whisper_wer.json", tmp_path, draw_figures=False)
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "EarlyStoppingCallback stopped it at step 1500 (epoch 1.36): 5 evaluations without improvement of "
        "eval_wer (the metric for best model: best 17.71 at step 250), its patience 5." in markdown
    )
    val = report["validation"]["val_loss"]
    assert (val["best_step"], val["best"]) == (best_step, round(best, 4))
    assert val["rising"]["rise_pct"] == pytest.approx(100 * (evals[-1][1] - best) / best, abs=0.01)
    assert "Train for longer" not in markdown and "eval_loss rose after step 250" in markdown
    # The loss fell within the first tenth (0.83 to 0.12 in 5 points), then stayed: a fall, not "no learning".
    assert report["loss"]["trend"]["kind"] == "fell" and report["loss"]["trend"]["from_first"]
    assert "No learning" not in markdown


def test_mid_run_checkpoint_is_named_and_the_report_covers_it_up_to_its_step(tmp_path: Path) -> None:
    write_report(
        CORPUS / "mid_run_checkpoint_tinyllama_early_stopping_state.json", tmp_path, draw_figures=False
    )
    markdown = (tmp_path / "report.md").read_text()
    assert "This report covers the run up to step 2800 (epoch 1.99) of max_steps 2808" in markdown
    assert "It was still running: this state was saved at step 2800 of max_steps 2808" in markdown
    assert "| Epochs run | 1.99 of 2: 1 complete, the last (2) partial (0.99 of it) |" in markdown
    assert "Train for longer" not in markdown


def test_overfitting_names_when_how_much_and_the_checkpoint(tmp_path: Path) -> None:
    report = write_report(CORPUS / "overfitting_ner_eval_rising.json", tmp_path, language="es")
    overfitting = report["validation"]["val_loss"]["overfitting"]
    assert (overfitting["from_step"], overfitting["best"], overfitting["last"]) == (5600, 1.202, 1.9195)
    markdown = (tmp_path / "report.md").read_text()
    assert "Sobreajuste: desde el paso 5600 (época 4)" in markdown
    assert "load_best_model_at_end=True" in markdown and "| Duración | 13 minutos, 1 segundo" in markdown
    assert set(report["figures"]) == {"loss", "grad_norm_lr"}


def test_nan_loss_is_found_marked_and_report_json_stays_strict(tmp_path: Path) -> None:
    # Derived from a real file (not part of the corpus count): the loss and grad norm diverge at step 80,
    # written by json.dumps as the Trainer writes it (bare NaN).
    state = json.loads((CORPUS / "one_epoch_noisy_falcon_lora.json").read_text())
    for entry in state["log_history"]:
        if "loss" in entry and entry["step"] >= 80:
            entry["loss"] = math.nan
            entry["grad_norm"] = math.nan
    source = tmp_path / "diverged" / "trainer_state.json"
    source.parent.mkdir()
    source.write_text(json.dumps(state, indent=2))
    assert "NaN" in source.read_text()
    report = write_report(source, tmp_path / "out", language="es")
    strict_json(tmp_path / "out" / "report.json")
    assert report["nonfinite"]["series"]["loss"]["first_step"] == 80
    assert report["nonfinite"]["series"]["grad_norm"]["first_step"] == 80
    assert report["loss"]["last"]["value"] is None and report["loss"]["last_finite"]["step"] == 70
    assert report["recommendations"][0]["kind"] == "nonfinite"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "La pérdida de entrenamiento es NaN desde el paso 80" in markdown
    assert "max_grad_norm" in markdown and report["run_name"] == "diverged"


def test_a_short_trainer_run_is_judged_with_a_window_of_its_size(tmp_path: Path) -> None:
    # 30 epoch points, one per epoch: window 3 (a tenth), not 15, which could not end a phase before
    # epoch 15. The loss falls to 0.0753 by epoch 9 and creeps to 0.0549 over the next 21.
    state = json.loads((CORPUS / "many_epochs_one_entry_each.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    report = write_report(CORPUS / "many_epochs_one_entry_each.json", tmp_path, draw_figures=False)
    phases = report["phases"]
    assert phases["options"]["window"] == 3 and phases["boundaries"] == [9]
    assert [(p["first"], p["last"], p["end_loss"]) for p in phases["phases"]] == [
        (1, 9, round(losses[8], 4)),
        (10, 30, round(losses[-1], 4)),
    ]
    markdown = (tmp_path / "report.md").read_text()
    assert "the window is a tenth of its 30 points, kept between 3 and 15" in markdown


def test_too_few_values_say_nothing_about_settling_or_the_schedule(tmp_path: Path) -> None:
    # 3 grad norms (3.79, 3.93, 5.93) and 3 rising learning rates: neither "settled" nor "then constant".
    report = write_report(CORPUS / "flat_at_chance_three_class.json", tmp_path, draw_figures=False)
    assert report["grad_norm"]["settled_from_epoch"] is None and not report["grad_norm"]["settling_judged"]
    assert report["learning_rate"]["shape"] == "warmup_rising"
    markdown = (tmp_path / "report.md").read_text()
    assert "Only 3 values logged: too few to tell whether it settled" in markdown
    assert "Schedule: warm-up: still rising at the last logged value" in markdown
    single = write_report(CORPUS / "single_entry.json", tmp_path / "single", draw_figures=False)
    assert single["learning_rate"]["shape"] == "too_few"


def test_per_class_metrics_are_one_row_per_class_and_every_value_stays_in_report_json(tmp_path: Path) -> None:
    state = json.loads((CORPUS / "overfitting_ner_eval_rising.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    f1 = [e["eval_T005_f1"] for e in evals if "eval_T005_f1" in e]
    report = write_report(CORPUS / "overfitting_ner_eval_rising.json", tmp_path, draw_figures=False)
    logged = {k for e in evals for k in e if k.startswith("eval_T")}
    assert {m["name"] for m in report["validation"]["other_metrics"]} >= logged  # nothing dropped
    groups = report["validation"]["metric_groups"]
    assert groups["measures"] == ["f1", "number", "precision", "recall"]
    assert groups["group_count"] == len({k.removeprefix("eval_").rsplit("_", 1)[0] for k in logged})
    markdown = (tmp_path / "report.md").read_text()
    number = evals[-1]["eval_T005_number"]
    assert f"| T005 | {len(f1)} | {f1[-1]:.4g} ({min(f1):.4g}–{max(f1):.4g}) | {number} |" in markdown
    assert "| eval_T005_f1 |" not in markdown and "| eval_overall_f1 |" in markdown
    assert len(markdown.splitlines()) < 150  # a row per metric made it about 250 lines
