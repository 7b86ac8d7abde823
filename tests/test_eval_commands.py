"""Answer evaluation through the real CLI and tiny model: fit, validate, test, predict, score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import PreTrainedTokenizerFast

from phi2tutor.cli import main
from phi2tutor.events import read_scalars, read_texts
from phi2tutor.tokenizer import bundled_tokenizer_path
from tests.conftest import tiny_config, write_yaml

MATH_EVAL = {
    "class_path": "callbacks.math_eval.MathAnswerEval",
    "init_args": {"num_problems": 8, "max_new_tokens": 12, "batch_size": 8},
}


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp_path = tmp_path_factory.mktemp("eval")
    config = tiny_config(tmp_path, trainer={"max_epochs": 2})
    config["trainer"]["callbacks"] = [
        MATH_EVAL,
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    ]
    main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])
    run_dir = sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]
    return run_dir, run_dir / "checkpoints" / "last.ckpt"


def test_fit_logs_answer_accuracy_each_epoch_and_sample_table(evaluated_run) -> None:
    run_dir, _ = evaluated_run
    scalars = read_scalars(run_dir)
    accuracy = scalars["val/answer_accuracy"]
    assert len(accuracy) == 2  # one per validation epoch; the fit-end pass is skipped (same weights)
    # Graded on exactly the 8 problems asked for: every rate is a count out of 8, logged at each epoch's end.
    invalid = scalars["val/answer_invalid_rate"]
    for _, rate in [*accuracy, *invalid]:
        assert 0.0 <= rate <= 1.0 and rate * 8 == pytest.approx(round(rate * 8))
    assert [step for step, _ in accuracy] == [step for step, _ in invalid] == [5, 11]
    texts = read_texts(run_dir)
    table = next(text for tag, entries in texts.items() if "answer_samples" in tag for _, text in entries)
    lines = table.splitlines()
    assert lines[0] == "| # | question | output | extracted | reference | correct |"
    rows = [line.split(" | ") for line in lines[2:]]
    assert len(rows) == 8  # num_problems problems, all shown (num_samples_logged defaults to 8)
    assert all(row[-2].isdigit() and row[-1].rstrip(" |") in {"yes", "no"} for row in rows)


@pytest.mark.parametrize(
    ("command", "key"), [("validate", "val/answer_accuracy"), ("test", "test/answer_accuracy")]
)
def test_validate_and_test_print_answer_accuracy_beside_loss(
    evaluated_run, capsys, command: str, key: str
) -> None:
    run_dir, checkpoint = evaluated_run
    main([command, "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint)])
    out = capsys.readouterr().out
    assert key in out and key.replace("answer_accuracy", "loss") in out


def test_predict_writes_one_json_line_per_question(evaluated_run, tmp_path: Path) -> None:
    run_dir, checkpoint = evaluated_run
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question": f"Ana has {n} apples and buys 2 more. How many?"}) + "\n"
            for n in range(5)
        )
    )
    output = tmp_path / "predictions.jsonl"
    main(
        [
            "predict",
            "--config",
            str(run_dir / "config.yaml"),
            "--ckpt_path",
            str(checkpoint),
            "--data.predict_path",
            str(questions),
            "--trainer.callbacks+=callbacks.predictions.PredictionWriter",
            f"--trainer.callbacks.output_path={output}",
        ]
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["question"] for r in rows] == [
        f"Ana has {n} apples and buys 2 more. How many?" for n in range(5)
    ]
    assert all(set(r) == {"question", "generation", "extracted_answer"} for r in rows)


def test_score_command_counts_and_json(tmp_path: Path, capsys) -> None:
    path = tmp_path / "preds.jsonl"
    rows = [
        {"prediction": "3 + 4 = 7\n#### 7", "answer": "#### 7"},
        {"prediction": "The answer is 12.", "answer": "Tom has 6 + 6 = 12\n#### 12"},
        {"prediction": "I think 5", "answer": "6"},
        {"prediction": "no idea", "answer": "6"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    main(["score", str(path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"accuracy": 0.5, "correct": 2, "wrong": 1, "invalid": 1, "total": 4}


def test_score_command_names_the_bad_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "preds.jsonl"
    path.write_text('{"prediction": "#### 1", "answer": "1"}\n{"prediction": "#### 2"}\n')
    with pytest.raises(SystemExit):
        main(["score", str(path)])
    err = capsys.readouterr().err
    assert "line 2" in err and "answer" in err and "Traceback" not in err


def test_evaluation_with_a_checkpoint_says_which_options_the_checkpoint_overrides(
    evaluated_run, lightning_messages
) -> None:
    """validate evaluates the checkpoint's model: a structural option given beside --ckpt_path cannot take
    effect and is named; a generation option given takes effect over the checkpoint's."""
    run_dir, checkpoint = evaluated_run
    saved_rank = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["lora_r"]
    main(
        ["validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint)]
        + ["--model.lora_r", str(saved_rank * 2), "--model.max_new_tokens", "3"]
    )
    log = lightning_messages.text
    assert (
        f"model.lora_r: the checkpoint's {saved_rank} is used, not {saved_rank * 2}: validate evaluates"
        in log
    )
    assert "model.max_new_tokens: 3 as given (the checkpoint's run used" in log


def test_predict_with_a_checkpoint_generates_with_the_given_max_new_tokens(
    evaluated_run, tmp_path: Path
) -> None:
    run_dir, checkpoint = evaluated_run
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "Ana has 3 apples and buys 2 more. How many?"}) + "\n")
    output = tmp_path / "predictions.jsonl"
    main(
        ["predict", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint)]
        + ["--data.predict_path", str(questions), "--model.max_new_tokens", "1"]
        + ["--trainer.callbacks+=callbacks.predictions.PredictionWriter"]
        + [f"--trainer.callbacks.output_path={output}"]
    )
    generation = json.loads(output.read_text())["generation"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(bundled_tokenizer_path())
    # The checkpoint's run generated up to the default 256 tokens: one token now, as given.
    assert len(tokenizer(generation, add_special_tokens=False)["input_ids"]) <= 1
