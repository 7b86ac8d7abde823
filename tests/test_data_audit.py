"""The data audit (phi2tutor data, and fit's data_report.md) finds exactly what was planted in small files."""

from __future__ import annotations

import json
from pathlib import Path

from phi2tutor.cli import main
from phi2tutor.data_audit import SplitRows, audit, near_duplicate_key, ngrams, percentile
from tests.conftest import tiny_config, write_yaml

LONG_QUESTION = (
    "A farmer plants seventeen rows of corn with twenty plants in every row and then harvests all of them "
    "in the autumn season. How many plants does the farmer harvest?"
)
TRAIN = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does Tom have?",
        "answer": "3 + 4 = <<3+4=7>>7\n#### 7",
    },
    # An exact duplicate (white space aside) and a near-duplicate (case and numbers aside) of the first row.
    {
        "question": "Tom has 3 apples  and buys 4 more. How many apples does Tom have?",
        "answer": "3 + 4 = 7\n#### 7",
    },
    {
        "question": "tom has 5 apples and buys 9 more. How many apples does Tom have?",
        "answer": "5 + 9 = 14\n#### 14",
    },
    {"question": LONG_QUESTION, "answer": "17 * 20 = 340\n#### 340"},
    {
        "question": "Sara reads 12 pages each day for 5 days. How many pages?",
        "answer": "12 * 5 = 60\n" * 40 + "#### 60",
    },
    {"question": "A box holds 6 eggs. How many eggs are in 7 boxes?", "answer": "6 * 7 = 42\n#### 42"},
]
VAL = [
    {"question": "Mia has 10 pens and gives away 2. How many are left?", "answer": "10 - 2 = 8\n#### 8"},
    {"question": "Each bus carries 30 kids. How many kids ride 2 buses?", "answer": "30 * 2 = 60\n#### 60"},
]
TEST = [
    # Shares the 13 words "plants seventeen rows ... then harvests" with a train question, and is no near-duplicate.
    {
        "question": "Every spring a farmer plants seventeen rows of corn with twenty plants in every row and then "
        "harvests all of them. How many rows are there?",
        "answer": "#### 17",
    },
    {
        "question": "Leo swims 4 laps on Monday and 6 on Tuesday. How many laps in all?",
        "answer": "4 + 6 = 10\n#### 10",
    },
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _files_config(tmp_path: Path) -> Path:
    config = tiny_config(tmp_path)
    config["data"] = {
        "source": "files",
        "train_path": str(_write_jsonl(tmp_path / "train.jsonl", TRAIN)),
        "val_path": str(_write_jsonl(tmp_path / "val.jsonl", VAL)),
        "test_path": str(_write_jsonl(tmp_path / "test.jsonl", TEST)),
        "max_length": 128,
        "batch_size": 2,
    }
    return write_yaml(tmp_path / "files.yaml", config)


def test_data_command_finds_the_planted_duplicates_overlap_and_long_answer(tmp_path: Path, capsys) -> None:
    config = _files_config(tmp_path)
    main(["data", "--config", str(config), "--output", str(tmp_path / "audit")])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "audit" / "data_report.json").read_text())
    train = report["splits"]["train"]
    assert [report["splits"][s]["rows"] for s in ("train", "val", "test")] == [6, 2, 2]
    assert (
        train["duplicates"]["exact_duplicate_rows"] == 1
        and train["duplicates"]["exact_duplicate_groups"] == 1
    )
    # Rows 1-3 are one near-duplicate group: two rows beyond its first.
    assert train["duplicates"]["near_duplicate_rows"] == 2
    assert report["splits"]["val"]["duplicates"]["near_duplicate_rows"] == 0
    overlap = report["overlap_with_train"]
    assert overlap["test"]["contaminated_13gram"] == 1 and overlap["test"]["exact_in_train"] == 0
    assert overlap["test"]["near_in_train"] == 0
    assert overlap["test"]["contaminated_examples"] == [TEST[0]["question"]]
    assert overlap["val"]["contaminated_13gram"] == 0
    # Only the 40-line answer is longer than 128 tokens; the advice names the length that truncates none.
    lengths = train["lengths"]
    assert lengths["truncated"] == 1
    assert lengths["max_length_to_truncate_none"] == lengths["total_tokens"]["max"] > 128
    assert train["difficulty"]["annotated_answers"] == 1 and train["difficulty"]["steps"]["max"] == 40
    keys = [(a["key"], a.get("split")) for a in report["recommendations"]]
    assert ("raise_max_length", "train") in keys and ("remove_duplicates", "train") in keys
    assert ("ngram_overlap", "test") in keys
    markdown = (tmp_path / "audit" / "data_report.md").read_text()
    assert f"Raise data.max_length to {lengths['max_length_to_truncate_none']}" in markdown
    assert "1 test question shares a 13-gram with a train question" in markdown
    assert (tmp_path / "audit" / "data_lengths.png").stat().st_size > 1000
    assert "phi2tutor data: wrote" in printed


def test_fit_writes_the_data_report_into_its_run_directory(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path, trainer={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1}
    )
    main(["fit", "--config", str(write_yaml(tmp_path / "c.yaml", config))])
    run_dir = tmp_path / "lightning_logs" / "version_0"
    report = json.loads((run_dir / "data_report.json").read_text())
    sizes = config["data"]["synthetic"]
    assert [report["splits"][s]["rows"] for s in ("train", "val", "test")] == [
        sizes["train_size"],
        sizes["val_size"],
        sizes["test_size"],
    ]
    assert (run_dir / "data_report.md").read_text().startswith("# Data report")


def test_audit_rules_on_plain_rows() -> None:
    assert near_duplicate_key("Tom  has 3,000 Apples.") == near_duplicate_key("tom has 12 apples.")
    assert len(ngrams("one two three")) == 1  # shorter than 13 words: one n-gram of all of them
    assert len(ngrams(" ".join(str(i) for i in range(15)))) == 3
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.95) == 10 and percentile([5], 0.95) == 5
    rows = SplitRows(["q a", "q b"], ["1\n#### 1", "#### 2"], [3, 4], [5, 6], annotations=[2, 0])
    result = audit({"train": rows}, max_length=8, annotations_kept=False)
    split = result["splits"]["train"]
    assert split["lengths"]["truncated"] == 1 and split["lengths"]["max_length_to_truncate_none"] == 10
    assert split["difficulty"]["annotated_answers"] == 1 and split["difficulty"]["annotations"] == 2
    json.dumps(result, allow_nan=False)


def test_spanish_report_uses_agreeing_words(tmp_path: Path) -> None:
    from phi2tutor.data_audit import render_markdown

    rows = SplitRows(["¿Cuántas?", "¿Cuántas?"], ["#### 1", "#### 1"], [3, 3], [2, 2])
    text = render_markdown(audit({"train": rows}, max_length=64), "es")
    assert "1 duplicado exacto en 1 grupo" in text and "Quite 1 fila duplicada exacta de train" in text
