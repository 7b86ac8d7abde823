"""The training report: what a run did, in numbers, words and figures, computed from the run's own records.

records (a phi2tutor run directory or an HF Trainer trainer_state.json, read into one record) ->
analysis (pure numbers: report.json) -> text (English, Spanish: report.md) and figures (PNG).
``phi2tutor report`` and the TrainingReport callback call ``write_report``.
"""

from phi2tutor.report.analysis import ReportSettings, build_report
from phi2tutor.report.records import RunRecords, load_records
from phi2tutor.report.text import LANGUAGES, NUMBER_PATTERN, TEXT, render_markdown
from phi2tutor.report.writer import main_report, write_figures, write_report

__all__ = [
    "LANGUAGES",
    "NUMBER_PATTERN",
    "TEXT",
    "ReportSettings",
    "RunRecords",
    "build_report",
    "load_records",
    "main_report",
    "render_markdown",
    "write_figures",
    "write_report",
]
