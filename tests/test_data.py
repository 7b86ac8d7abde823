"""MathDataModule: label masking, sources, splits and the messages for bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from phi2tutor.cli import main
from phi2tutor.data import MathDataModule, read_records
from phi2tutor.errors import Phi2TutorError
from phi2tutor.loading import bundled_tokenizer_dir
from tests.conftest import tiny_config, write_yaml

ROWS = [
    {
        "question": "Ana has 3 apples and buys 4 more. How many apples does she have?",
        "answer": "3 + 4 = <<3+4=7>>7\n#### 7",
    },
    {"question": "Tom had 9 pens and gave away 2. How many are left?", "answer": "9 - 2 = 7\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6 * 5 = 30\n#### 30"},
    {"question": "Eva reads 10 pages a day. How many pages in 3 days?", "answer": "10 * 3 = 30\n#### 30"},
]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def datamodule(**kwargs) -> MathDataModule:
    kwargs.setdefault("tokenizer_name_or_path", str(bundled_tokenizer_dir()))
    kwargs.setdefault("max_length", 128)
    return MathDataModule(**kwargs)


def test_labels_mask_prompt_and_padding_and_keep_eos(tmp_path: Path) -> None:
    data = datamodule(
        source="files",
        train_path=str(write_jsonl(tmp_path / "t.jsonl", ROWS)),
        val_path=str(write_jsonl(tmp_path / "v.jsonl", ROWS[:2])),
        batch_size=4,
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    tokenizer = data.tokenizer
    eos = tokenizer.eos_token_id
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        labels = batch["labels"][row]
        ids = batch["input_ids"][row]
        assert (labels[length:] == -100).all()  # padding (EOS ids) is not learned
        assert (ids[length:] == eos).all()
        assert labels[length - 1] == eos  # the answer's EOS is learned: generations stop
        target = labels[labels != -100]
        text = tokenizer.decode(target, skip_special_tokens=True)
        assert text.startswith(" ") and text.strip().endswith("#### 7")
        prompt = tokenizer.decode(ids[: length - len(target)])
        assert prompt.startswith("Instruct: ") and prompt.endswith("\nOutput:")


def test_calculator_annotations_removed_by_default_and_kept_on_request(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "t.jsonl", ROWS))
    assert (
        datamodule(source="files", train_path=path, val_path=path).load_rows()["train"][0]["answer"]
        == "3 + 4 = 7\n#### 7"
    )
    kept = datamodule(
        source="files", train_path=path, val_path=path, keep_calculator_annotations=True
    ).load_rows()
    assert kept["train"][0]["answer"] == "3 + 4 = <<3+4=7>>7\n#### 7"


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    rows = [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(40)
    ]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    first = datamodule(source="files", train_path=path, val_fraction=0.25, seed=3).load_rows()
    second = datamodule(source="files", train_path=path, val_fraction=0.25, seed=3).load_rows()
    assert first["val"] == second["val"] and len(first["val"]) == 10 and len(first["train"]) == 30
    assert not {r["question"] for r in first["val"]} & {r["question"] for r in first["train"]}


def test_truncated_examples_are_counted(tmp_path: Path) -> None:
    long_answer = {"question": "Short?", "answer": " ".join(["step"] * 200) + "\n#### 1"}
    path = str(write_jsonl(tmp_path / "t.jsonl", [long_answer, *ROWS]))
    data = datamodule(source="files", train_path=path, val_path=path, max_length=64)
    data.setup("fit")
    assert data.truncated_examples == 1
    assert max(len(e.input_ids) for e in data.datasets["train"].examples) == 64


def test_json_and_parquet_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.json").write_text(json.dumps({"data": ROWS}))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    assert [r for _, r in read_records(tmp_path / "t.json")] == ROWS
    assert [r for _, r in read_records(tmp_path / "t.parquet")] == ROWS


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda p: {"train_path": str(p / "missing.jsonl")},
            r"train data \(data.train_path\) file .*missing.jsonl does not exist",
        ),
        (
            lambda p: {"train_path": str(write_jsonl(p / "t.jsonl", ROWS, {2: "{not json"}))},
            "t.jsonl, line 3 is not valid JSON",
        ),
        (
            lambda p: {"train_path": str(write_jsonl(p / "t.jsonl", [*ROWS[:2], {"question": "Q?"}]))},
            "t.jsonl, line 3 has no 'question' or 'answer' field",
        ),
        (
            lambda p: {
                "train_path": str(write_jsonl(p / "t.jsonl", [*ROWS, {"question": "Q?", "answer": "7"}]))
            },
            'line 5 has an answer without a final "#### N"',
        ),
        (
            lambda p: {
                "train_path": str(
                    write_jsonl(p / "t.jsonl", [*ROWS, {"question": "Q?", "answer": ["3 + 4 = 7", "#### 7"]}])
                )
            },
            """line 5 has a 'answer' that is not text but ["3 + 4 = 7", "#### 7"]""",
        ),
        (
            lambda p: {
                "train_path": str(write_jsonl(p / "t.jsonl", [{"question": None, "answer": "#### 1"}]))
            },
            "line 1 has a 'question' that is not text but null",
        ),
        (
            lambda p: {
                "train_path": str(
                    write_jsonl(p / "t.jsonl", [*ROWS, {"question": "Q?", "answer": "#### seven"}])
                )
            },
            'line 5 has an answer whose final "#### seven" is not a number',
        ),
        (
            lambda p: {
                "train_path": str(write_jsonl(p / "t.jsonl", ROWS)),
                "val_path": str(write_jsonl(p / "v.jsonl", [])),
            },
            "The val split is empty",
        ),
        (
            lambda p: {"train_path": str(write_jsonl(p / "t.jsonl", ROWS)), "answer_field": "solution"},
            "Set data.question_field / data.answer_field",
        ),
    ],
)
def test_bad_input_names_file_and_line(tmp_path: Path, setup, message: str) -> None:
    data = datamodule(source="files", **setup(tmp_path))
    with pytest.raises(
        Phi2TutorError, match=message if message.startswith("train data") else re.escape(message)
    ):
        data.setup("fit")


def test_prompt_longer_than_max_length_is_an_error_or_skipped(tmp_path: Path) -> None:
    rows = [*ROWS, {"question": "word " * 300, "answer": "#### 1"}]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    with pytest.raises(
        Phi2TutorError, match=r"prompts of the train split \(.*t.jsonl, line 5\) are 128 tokens or longer"
    ):
        datamodule(source="files", train_path=path, val_path=path).setup("fit")
    data = datamodule(source="files", train_path=path, val_path=path, skip_invalid_rows=True)
    data.setup("fit")
    assert len(data.datasets["train"]) == 4


def test_skip_invalid_rows_reports_count(tmp_path: Path, caplog) -> None:
    rows = [
        *ROWS,
        {"question": "Q?", "answer": "no final answer"},
        {"q": "x"},
        {"question": "Q?", "answer": ["3 + 4 = 7", "#### 7"]},
        {"question": None, "answer": "#### 1"},
        {"question": "Q?", "answer": "#### seven"},
    ]
    data = datamodule(
        source="files",
        train_path=str(write_jsonl(tmp_path / "t.jsonl", rows)),
        skip_invalid_rows=True,
        val_fraction=0.25,
    )
    with caplog.at_level("INFO"):
        rows_by_split = data.load_rows()
    assert len(rows_by_split["train"]) + len(rows_by_split["val"]) == 4
    assert "skipped 5 invalid rows" in caplog.text


def test_cli_prints_one_paragraph_error_without_traceback(tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path)
    config["data"] = {"source": "files", "train_path": str(tmp_path / "nope.jsonl")}
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_yaml(tmp_path / "bad.yaml", config))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "phi2tutor: error: The train data (data.train_path) file" in err and "nope.jsonl" in err
    assert "Traceback" not in err


def test_hub_source_without_network_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = datamodule(source="hub", hub_dataset="openai/gsm8k")
    with pytest.raises(Phi2TutorError, match="Could not load the dataset 'openai/gsm8k'.*data.source: files"):
        data.load_rows()
