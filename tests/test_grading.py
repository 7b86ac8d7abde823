"""Tests of phi2tutor.grading: answer extraction and comparison, the synced metric, and score_predictions."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from phi2tutor.errors import Phi2TutorError
from phi2tutor.grading import (
    GradedAnswer,
    answers_match,
    extract_answer,
    grade,
    main_score,
    parse_number,
    reference_answer,
    score_predictions,
)
from phi2tutor.metrics import MathAnswerAccuracy

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)

# (generation, reference, decimal_comma, expected extracted answer, expected correct)
GRADING_TABLE = [
    # 1. "#### N", lm-eval strict-match: its first match wins
    (GSM8K_SOLUTION, "#### 72", False, "72", True),
    ("#### 1,234", "1234", False, "1,234", True),
    ("So he lost 5 points.\n#### -5", "#### -5", False, "-5", True),
    ("#### 72.", "72", False, "72", True),
    ("4 + 3 = 7\n#### 7\nInstruct: Tom has 9 apples", "7", False, "7", True),
    ("#### 7\n#### 8", "8", False, "7", False),
    ("####72", "72", False, "72", True),
    ("#### $18", "18", False, "18", True),
    ("The answer is 3, I think.\n#### 5", "3", False, "5", False),
    ("#### 0.50", "1/2", False, "0.50", True),
    # 2. "The answer is N": the last one, before any later number
    ("The answer is 18.", "#### 18", False, "18", True),
    ("So the answer is $1,200.50.", "1200.5", False, "1,200.50", True),
    ("The final answer is -3", "3", False, "-3", False),
    ("Is the answer is 5? No: 5 * 2 = 10. The answer is 6.", "6", False, "6", True),
    ("THE ANSWER IS 42", "42", False, "42", True),
    ("The answer is 1/2 of the pie, shared by 3 friends.", "0.5", False, "1/2", True),
    ("La respuesta es 2,5.", "2,5", True, "2,5", True),
    # 3. a last line "A: N"
    ("Q: Tom has 3 apples and buys 12 more.\nA: 15", "15", False, "15", True),
    ("He pays 3 * 5 = 15 in total.\nA: 15 dollars\n", "15", False, "15", True),
    ("A: 5 apples + 3 apples = 8 apples", "8", False, "8", True),  # several numbers: last-number rule
    # 4. \boxed{N}
    ("So we get \\boxed{\\frac{1}{2}}.", "0.5", False, "1/2", True),
    ("\\boxed{1{,}000} dollars, paid over 3 days", "1000", False, "1,000", True),
    ("$x = \\boxed{-4}$", "-4", False, "-4", True),
    ("The total is \\boxed{25\\%}", "25", False, "25", True),
    # 5. the last number, lm-eval flexible-extract
    ("She has 5 + 7 = 12 apples.", "12", False, "12", True),
    ("So she spends $1,234 in all.", "#### 1234", False, "1,234", True),
    ("It costs 18.00 dollars", "18", False, "18.00", True),
    ("He ends with -7 points", "7", False, "-7", False),
    ("The temperature is \u22127 degrees", "-7", False, "-7", True),
    ("Half of it: 1/2", "0.5", False, "1/2", True),
    ("25% of them came.", "25", False, "25", True),
    ("She waited... then ate 9.", "9", False, "9", True),
    ("It costs .5 dollars", "0.5", False, ".5", True),
    ("Total: $12.", "12", False, "12", True),
    ("18 dollars + 2 dollars = 20 dollars. The answer is 20", "#### 20.00", False, "20", True),
    # no answer at all: invalid, never "wrong"
    ("I don't know.", "5", False, None, False),
    ("", "5", False, None, False),
    ("Wait...", "5", False, None, False),  # lm-eval would take "..." as the answer
    ("#### ", "5", False, None, False),
    ("The answer is unclear.", "5", False, None, False),
    # decimal comma (Spanish) on and off
    ("Son 2,5 litros.", "2,5", True, "2,5", True),
    ("Son 2,5 litros.", "25", False, "2,5", True),  # off: a comma separates thousands, as in lm-eval
    ("#### 2,5", "2.5", False, "2,5", False),
    ("Cuesta 1.500 euros.", "#### 1500", True, "1.500", True),
    ("Cuesta 1.234,5 euros.", "1234,5", True, "1.234,5", True),
    ("#### 3,75", "3.75", True, "3,75", True),
]


@pytest.mark.parametrize(("generation", "reference", "decimal_comma", "extracted", "correct"), GRADING_TABLE)
def test_extraction_and_comparison(
    generation: str, reference: str, decimal_comma: bool, extracted: str | None, correct: bool
) -> None:
    assert extract_answer(generation, decimal_comma) == extracted
    graded = grade(generation, reference, decimal_comma)
    assert graded == GradedAnswer(
        extracted=extracted,
        reference=reference_answer(reference, decimal_comma),
        correct=correct,
        invalid=extracted is None,
    )


def test_table_is_large_and_covers_every_outcome() -> None:
    assert len(GRADING_TABLE) >= 40
    outcomes = {(extracted is None, correct) for _, _, _, extracted, correct in GRADING_TABLE}
    assert outcomes == {(False, True), (False, False), (True, False)}


@pytest.mark.parametrize(
    ("predicted", "reference", "decimal_comma", "expected"),
    [
        ("18.00", "18", False, True),
        ("1/2", "0.5", False, True),
        ("-0.5", "-1/2", False, True),
        ("-3", "3", False, False),
        ("2,5", "2.5", True, True),
        ("$1,200", "1200", False, True),
        ("1.500", "1500", True, True),
        ("1.500", "1.5", False, True),
        ("25%", "25", False, True),
        ("18 dollars", "18", False, True),
        ("3 or 4", "3", False, False),
        ("1/0", "0", False, False),
        ("Yes", "yes.", False, True),
        ("yes", "5", False, False),
        (None, "5", False, False),
    ],
)
def test_answers_match(predicted: str | None, reference: str, decimal_comma: bool, expected: bool) -> None:
    assert answers_match(predicted, reference, decimal_comma) is expected


@pytest.mark.parametrize(
    ("text", "decimal_comma", "expected"),
    [
        ("$1,234.50", False, Fraction(2469, 2)),
        ("2,5", True, Fraction(5, 2)),
        ("2,5", False, Fraction(25)),
        ("1,200.50", True, Fraction(2401, 2)),  # both marks: the last one is the decimal mark
        ("-$5", False, Fraction(-5)),
        ("$-5", False, Fraction(-5)),
        ("+5", False, Fraction(5)),
        ("12.", False, Fraction(12)),
        ("1 2", False, None),
        ("1.2.3", False, None),
        ("3 and 4", False, None),
        ("", False, None),
        ("abc", False, None),
    ],
)
def test_parse_number(text: str, decimal_comma: bool, expected: Fraction | None) -> None:
    assert parse_number(text, decimal_comma) == expected


@pytest.mark.parametrize(
    ("answer_text", "expected"),
    [
        (GSM8K_SOLUTION, "72"),
        ("#### 1,000", "1,000"),
        ("72", "72"),
        (" $1,200 ", "$1,200"),
        ("#### ", None),
        ("She has 3 apples and 4 pears.", None),
    ],
)
def test_reference_answer(answer_text: str, expected: str | None) -> None:
    assert reference_answer(answer_text) == expected


def test_grade_rejects_a_reference_without_final_answer() -> None:
    with pytest.raises(ValueError, match="has no final answer"):
        grade("#### 3", "She has 3 apples and 4 pears.")


# --- the metric ---------------------------------------------------------------------------------------


def test_metric_counts_correct_invalid_and_total_across_updates() -> None:
    metric = MathAnswerAccuracy()
    metric.update(["#### 1", "#### 2", "no idea"], ["1", "#### 3", "4"])
    metric.update(["The answer is 2,5"], ["25"])
    assert metric.compute().item() == pytest.approx(0.5)
    assert metric.summary() == {"accuracy": 0.5, "invalid_rate": 0.25, "correct": 2, "invalid": 1, "total": 4}
    metric.reset()
    assert metric.compute().item() == 0.0
    assert metric.summary()["total"] == 0


def test_metric_decimal_comma_option() -> None:
    metric = MathAnswerAccuracy(decimal_comma=True)
    metric.update(["La respuesta es 2,5"], ["2.5"])
    assert metric.compute().item() == 1.0


def test_metric_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 generations but 1 references"):
        MathAnswerAccuracy().update(["1", "2"], ["1"])


# Rank 0 grades 3 outputs (2 right, 1 invalid), rank 1 grades 1 (wrong): 2/4 overall, not the mean 0.33 of
# per-process accuracies (0.67 and 0).
_SYNC_SHARDS = {
    0: (["#### 1", "#### 2", "nothing"], ["1", "2", "3"]),
    1: (["#### 5"], ["4"]),
}


def _sync_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = MathAnswerAccuracy()
        metric.update(*_SYNC_SHARDS[rank])
        accuracy = metric.compute().item()
        summary = metric.summary()
        local_total = int(metric.total)  # states are restored to this process's own after syncing
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"accuracy": accuracy, "summary": summary, "local_total": local_total})
        )
    finally:
        dist.destroy_process_group()


def test_metric_syncs_across_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Several threads per process would oversubscribe small machines for no gain in a test this small.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for rank, result in results.items():
        assert result["accuracy"] == pytest.approx(0.5)
        assert result["summary"] == {
            "accuracy": 0.5,
            "invalid_rate": 0.25,
            "correct": 2,
            "invalid": 1,
            "total": 4,
        }
        assert result["local_total"] == len(_SYNC_SHARDS[rank][0])


def test_metric_is_a_torch_module_with_sum_states() -> None:
    metric = MathAnswerAccuracy()
    assert {name: metric._reductions[name].__name__ for name in ("correct", "invalid", "total")} == {
        "correct": "dim_zero_sum",
        "invalid": "dim_zero_sum",
        "total": "dim_zero_sum",
    }
    assert metric.correct.dtype == torch.long


# --- score_predictions ------------------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_score_predictions_counts(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "predictions.jsonl",
        [
            json.dumps({"prediction": "3 + 4 = 7\n#### 7", "answer": "#### 7"}),  # correct
            json.dumps({"prediction": "The answer is $1,200.", "answer": "Steps.\n#### 1200"}),  # correct
            "",  # blank lines are skipped
            json.dumps({"prediction": "#### 8", "answer": "#### 9"}),  # wrong
            json.dumps({"prediction": "I cannot solve this.", "answer": "#### 2"}),  # invalid
            "   ",
            json.dumps({"prediction": None, "answer": "#### 2"}),  # no output at all: invalid
            json.dumps({"prediction": 5, "answer": 5}),  # numbers are read as text: correct
        ],
    )
    summary, rows = score_predictions(path)
    assert summary == {"accuracy": 0.5, "correct": 3, "wrong": 1, "invalid": 2, "total": 6}
    assert [row["line"] for row in rows] == [1, 2, 4, 5, 7, 8]
    assert rows[1] == dict(line=2, extracted="1,200", reference="1200", correct=True, invalid=False)
    assert rows[2] == {"line": 4, "extracted": "8", "reference": "9", "correct": False, "invalid": False}
    assert rows[3]["invalid"] is True and rows[3]["extracted"] is None


def test_score_predictions_custom_fields_and_decimal_comma(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "es.jsonl",
        [
            json.dumps({"salida": "La respuesta es 2,5.", "respuesta": "#### 2,5"}),
            json.dumps({"salida": "Son 1.500 euros.", "respuesta": "#### 1500"}),
        ],
    )
    summary, _ = score_predictions(path, "salida", "respuesta", decimal_comma=True)
    assert summary == {"accuracy": 1.0, "correct": 2, "wrong": 0, "invalid": 0, "total": 2}
    # Without the option both sides of row 1 read 25 (still equal), but "1.500" reads 1.5, not 1500.
    summary, rows = score_predictions(path, "salida", "respuesta", decimal_comma=False)
    assert summary == {"accuracy": 0.5, "correct": 1, "wrong": 1, "invalid": 0, "total": 2}
    assert [row["correct"] for row in rows] == [True, False]


def test_score_predictions_empty_file_is_an_error(tmp_path: Path) -> None:
    # "accuracy 0.0000 (0/0)" with exit 0 would read as a result; an empty file is a mistake.
    with pytest.raises(Phi2TutorError, match=r"empty\.jsonl holds no rows .* nothing to grade"):
        score_predictions(_write_lines(tmp_path / "empty.jsonl", ["", ""]))


def test_error_names_file_and_line_for_invalid_json(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "bad.jsonl",
        [json.dumps({"prediction": "#### 1", "answer": "1"}), "", '{"prediction": "#### 2", "answer": '],
    )
    with pytest.raises(Phi2TutorError) as raised:
        score_predictions(path)
    message = str(raised.value)
    assert message.startswith(f"{path}, line 3: not valid JSON")
    assert "must be one JSON object" in message and "fix or delete that line" in message
    assert "\n" not in message


def test_error_for_a_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "list.jsonl", ['["#### 1", "1"]'])
    with pytest.raises(Phi2TutorError, match=r"line 1: a JSON list, not an object"):
        score_predictions(path)


def test_error_names_the_missing_field_and_the_option(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "fields.jsonl",
        [
            json.dumps({"prediction": "#### 1", "answer": "1"}),
            json.dumps({"output": "#### 2", "answer": "2"}),
        ],
    )
    with pytest.raises(Phi2TutorError) as raised:
        score_predictions(path)
    message = str(raised.value)
    assert message.startswith(f"{path}, line 2: no field 'prediction' (fields there: 'output', 'answer')")
    assert "set prediction_field to that name (now 'prediction')" in message


def test_error_for_a_reference_without_final_answer(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "ref.jsonl", [json.dumps({"prediction": "#### 1", "answer": "3 and 4"})])
    with pytest.raises(Phi2TutorError, match=r"line 1: the reference 'answer' \('3 and 4'\) states no final"):
        score_predictions(path)


def test_error_for_a_reference_whose_final_answer_is_not_a_number(tmp_path: Path) -> None:
    """The training data's rule: "#### " must be followed by a number."""
    path = _write_lines(
        tmp_path / "ref.jsonl", [json.dumps({"prediction": "#### 7", "answer": "#### seven"})]
    )
    with pytest.raises(
        Phi2TutorError, match=r"line 1: the reference 'answer' \('#### seven'\) states no final"
    ):
        score_predictions(path)


def test_error_for_a_field_that_is_not_text(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "type.jsonl", [json.dumps({"prediction": ["#### 1"], "answer": "1"})])
    with pytest.raises(Phi2TutorError, match=r'line 1: field \'prediction\' is \["#### 1"\], not text'):
        score_predictions(path)


def test_error_for_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "predictions.jsonl"
    with pytest.raises(Phi2TutorError) as raised:
        score_predictions(path)
    assert str(raised.value).startswith(f"The predictions file {path} does not exist")
    assert "Check the path" in str(raised.value)


def test_main_score_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps({"out": "#### 7", "ref": "#### 7"}),
            json.dumps({"out": "#### 8", "ref": "#### 9"}),
            json.dumps({"out": "no idea", "ref": "2"}),
        ],
    )
    main_score([str(path), "--prediction_field", "out", "--reference_field", "ref", "--details"])
    assert capsys.readouterr().out.splitlines() == [
        "line 2: wrong: 8, reference 9",
        "line 3: invalid (no answer found), reference 2",
        f"{path}: accuracy 0.3333 (1/3 correct, 1 wrong, 1 invalid: no answer found)",
    ]
    main_score([str(path), "--prediction_field", "out", "--reference_field", "ref", "--json"])
    assert json.loads(capsys.readouterr().out) == {
        "accuracy": 1 / 3,
        "correct": 1,
        "wrong": 1,
        "invalid": 1,
        "total": 3,
    }
