"""Writing the report: report.json (strict JSON), report.md and the figures, and ``phi2tutor report``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phi2tutor.keys import REPORT_JSON, REPORT_MD
from phi2tutor.report.analysis import PHASE_NAME_KEYS, ReportSettings, build_report
from phi2tutor.report.records import RunRecords, load_records
from phi2tutor.report.text import LANGUAGES, TEXT, check_language, render_markdown


def write_figures(
    records: RunRecords, report: dict[str, Any], output_dir: Path, language: str
) -> dict[str, str]:
    """Draw the figures whose data were logged; return {figure name: file name} for report.md."""
    from phi2tutor.report import figures

    names = {key: TEXT[language][f"phase_{key}"] for key in PHASE_NAME_KEYS}
    run = report["run_name"]
    written: dict[str, str] = {}
    # No loss logged (a run stopped in its first step): no loss curve, and no step it could be drawn against.
    inputs = figures.figure_inputs(records, report, names) if report["loss"] is not None else None
    if inputs is not None:
        figures.plot_loss(
            output_dir / figures.FIGURE_FILES["loss"], run_name=run, language=language, **inputs["loss"]
        )
        written["loss"] = figures.FIGURE_FILES["loss"]
    grad_norm_lr = inputs["grad_norm_lr"] if inputs is not None else None
    if grad_norm_lr and (grad_norm_lr["grad_norms"] or grad_norm_lr["learning_rates"]):
        figures.plot_grad_norm_and_lr(
            output_dir / figures.FIGURE_FILES["grad_norm_lr"], run_name=run, language=language, **grad_norm_lr
        )
        written["grad_norm_lr"] = figures.FIGURE_FILES["grad_norm_lr"]
    if records.memory_series:
        budget = (records.memory or {}).get("budget_mb")
        figures.plot_memory(
            output_dir / figures.FIGURE_FILES["memory"], records.memory_series, budget, run, language
        )
        written["memory"] = figures.FIGURE_FILES["memory"]
    if records.answer_accuracy:
        figures.plot_answer_accuracy(
            output_dir / figures.FIGURE_FILES["answer_accuracy"],
            [(epoch, 100 * value) for epoch, value in records.answer_accuracy],
            run,
            language,
        )
        written["answer_accuracy"] = figures.FIGURE_FILES["answer_accuracy"]
    return written


def report_directory(source: str | Path, output_dir: str | Path | None = None) -> Path:
    """Where a run's report goes: ``output_dir``, else the run directory (a trainer_state.json's folder)."""
    if output_dir is not None:
        return Path(output_dir)
    source = Path(source)
    return source if source.is_dir() else source.parent


def write_report(
    source: str | Path,
    output_dir: str | Path | None = None,
    *,
    language: str = "en",
    phase_boundaries: Sequence[int] | None = None,
    settings: ReportSettings | None = None,
    draw_figures: bool = True,
) -> dict[str, Any]:
    """Analyse a run and write report.md, report.json and the figures; return report.json's content.

    Args:
        source: a phi2tutor run directory, or an HF Trainer trainer_state.json (or its folder).
        output_dir: where to write; default the run directory (the trainer_state.json's folder).
        language: "en" or "es" for report.md and the figures' labels.
        phase_boundaries: last epochs (or steps) of the first phases, instead of detecting them.
        settings: the report's rules of judgement.
        draw_figures: write the PNG figures.
    """
    check_language(language)  # before the run is read
    records = load_records(source)
    report = build_report(records, phase_boundaries=phase_boundaries, settings=settings)
    report["language"] = language
    output = report_directory(records.source, output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if draw_figures:
        report["figures"] = write_figures(records, report, output, language)
    # allow_nan=False: report.json is strict JSON; the analysis writes null for a missing or non-finite value.
    (output / REPORT_JSON).write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )
    (output / REPORT_MD).write_text(render_markdown(report, language))
    return report


def main_report(args: list[str]) -> None:
    """``phi2tutor report RUN_DIR_OR_TRAINER_STATE [--language en|es] [--output DIR] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="phi2tutor report",
        description="Write the training report of a run: report.md, report.json and PNG figures, from the run's "
        "own records (a phi2tutor run directory, or a Hugging Face Trainer trainer_state.json).",
    )
    parser.add_argument("path", help="run directory (lightning_logs/version_N) or trainer_state.json")
    parser.add_argument(
        "--language", choices=LANGUAGES, default="en", help="language of report.md (default en)"
    )
    parser.add_argument("--output", default=None, help="directory to write into (default: the run directory)")
    parser.add_argument("--json", action="store_true", help="also print report.json's content to stdout")
    parser.add_argument(
        "--phase_boundaries",
        "--phase-boundaries",
        type=int,
        nargs="+",
        default=None,
        metavar="POSITION",
        help="last epochs (or steps, for a run analysed by step) of the first phases (at most two), instead "
        "of detecting them; e.g. 50 100",
    )
    options = parser.parse_args(args)
    report = write_report(
        options.path, options.output, language=options.language, phase_boundaries=options.phase_boundaries
    )
    if options.json:
        print(json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False))
    else:
        where = report_directory(report["source"], options.output)
        count = len(report["figures"])
        print(
            f"phi2tutor report: wrote {where / REPORT_MD}, {where / REPORT_JSON} and {count} figure{'s' * (count != 1)}"
        )
