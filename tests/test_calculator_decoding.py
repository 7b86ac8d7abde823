"""Calculator-assisted decoding on the demo base: forced tokens per row in a left-padded batch equal
single-row decoding, declined expressions leave the model's tokens alone, the adapter directory records
the calculator, and annotated bundled problems round-trip through grading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

from phi2tutor.calculator_decoding import (
    CalculatorLogitsProcessor,
    equals_token_ids,
    forced_token_ids,
    open_expression,
)
from phi2tutor.grading import grade, reference_answer
from phi2tutor.keys import TUTOR_SETTINGS_JSON as ADAPTER_RECORD_JSON
from phi2tutor.model import TutorModule
from phi2tutor.synthetic import SyntheticSpec, final_answer, generate_splits
from tests.conftest import REPO

DEMO_BASE = REPO / "phi2tutor" / "assets" / "tiny-phi-arith"
# Prompts whose last tokens open an annotation; the processor reads the last TAIL prompt tokens as if the
# model had written them (its prompt_length), so the calculator fires at the first step in those rows.
PROMPTS = [
    "Ana has 12 boxes. 12 * 34 = <<12*34=",
    "Ana has 7 apples and",
    "So 7 - 9 = <<7-9=",
    "then 5 / 0 = <<5/0=",
]
TAIL = 12


@pytest.fixture(scope="module")
def demo_tutor() -> TutorModule:
    tutor = TutorModule(model_name_or_path=str(DEMO_BASE))
    tutor.configure_model()
    tutor.eval()
    return tutor


def _decode(tutor: TutorModule, prompts: list[str], calculator: bool):
    tokenizer = tutor.tokenizer
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    processor = CalculatorLogitsProcessor(
        tokenizer, encoded["input_ids"].shape[1] - TAIL, equals_token_ids(tokenizer)
    )
    with torch.no_grad():
        output = tutor.model.generate(
            **encoded,
            max_new_tokens=10,
            do_sample=False,
            logits_processor=LogitsProcessorList([processor] if calculator else []),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = output[:, encoded["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True), processor.counts


def test_batch_forcing_matches_single_rows(demo_tutor: TutorModule) -> None:
    batched, counts = _decode(demo_tutor, PROMPTS, calculator=True)
    singles = [_decode(demo_tutor, [prompt], calculator=True)[0][0] for prompt in PROMPTS]
    plain, _ = _decode(demo_tutor, PROMPTS, calculator=False)
    assert batched == singles
    assert batched[0].startswith("408>>")
    assert batched[2].startswith("-2>>")
    assert not plain[0].startswith("408>>")  # the base's own tokens differ: the calculator changed them
    # No annotation in row 1, a declined division by zero in row 3: the model's own tokens.
    assert batched[1] == plain[1]
    assert batched[3] == plain[3]
    assert (counts.calls, counts.declined) == (2, 1)
    assert counts.changed == 2


def test_open_expression_and_forced_tokens(demo_tutor: TutorModule) -> None:
    assert open_expression("so 48 * 17 = <<48*17=") == "48*17"
    assert open_expression("48 * 17 = ") is None
    assert open_expression("<<2*3=6>>6 and 6 =") is None
    tokenizer = demo_tutor.tokenizer
    ids = forced_token_ids(tokenizer, "x = <<48*17=", "816")
    assert tokenizer.decode(ids) == "816>>"
    # The bundled tokenizer writes digits one by one, as in training.
    assert [tokenizer.decode([i]) for i in ids] == ["8", "1", "6", ">", ">"]


def test_generate_counts_and_switch(demo_tutor: TutorModule) -> None:
    questions = ["Ana has 7 apples and buys 5 more. How many apples does Ana have now?"]
    assert demo_tutor.calculator_enabled is False  # no annotated data, no adapter record
    demo_tutor.generate(questions, max_new_tokens=8)
    assert demo_tutor.last_calculator_counts is None
    demo_tutor.generate(questions, max_new_tokens=8, calculator=True)
    assert demo_tutor.last_calculator_counts is not None


def test_adapter_directory_records_the_calculator(demo_tutor: TutorModule, tmp_path: Path) -> None:
    demo_tutor.hparams.annotated_training_data = True
    try:
        directory = demo_tutor.save_adapter(tmp_path / "adapter")
    finally:
        demo_tutor.hparams.annotated_training_data = False
    record = json.loads((directory / ADAPTER_RECORD_JSON).read_text())["tutor"]
    assert record["calculator"] is True and record["annotated_training_data"] is True
    loaded = TutorModule(model_name_or_path=str(DEMO_BASE), adapter_path=str(directory))
    assert loaded.calculator_enabled is True
    assert TutorModule(adapter_path=str(directory), calculator=False).calculator_enabled is False


@pytest.mark.parametrize("language", ["en", "es"])
def test_annotated_problems_round_trip_through_grading(language: str) -> None:
    spec = SyntheticSpec(train_size=40, val_size=0, test_size=0, language=language, two_step_share=0.5)
    plain = generate_splits(spec)["train"]
    annotated = generate_splits(SyntheticSpec(**{**spec.__dict__, "calculator_annotations": True}))["train"]
    assert [p["question"] for p in plain] == [p["question"] for p in annotated]
    for before, after in zip(plain, annotated):
        lines = after["answer"].splitlines()
        assert all("<<" in line for line in lines[:-1]) and lines[-1].startswith("####")
        assert reference_answer(after["answer"]) == str(final_answer(before["answer"]))
        assert grade(after["answer"], before["answer"]).correct
        assert grade(before["answer"], after["answer"]).correct
    assert annotated[0]["answer"].count("<<") == annotated[0]["answer"].count(">>")


def test_fit_on_annotated_data_turns_the_calculator_on(tmp_path: Path) -> None:
    from phi2tutor.calculator import calculate
    from phi2tutor.cli import main
    from tests.conftest import tiny_config, write_yaml

    config = tiny_config(
        tmp_path,
        data={
            "keep_calculator_annotations": True,
            "synthetic": {"train_size": 48, "val_size": 8, "test_size": 8},
        },
    )
    config["trainer"]["max_epochs"] = 1
    config["trainer"]["callbacks"] = [
        {
            "class_path": "callbacks.math_eval.MathAnswerEval",
            "init_args": {"num_problems": 8, "max_new_tokens": 24},
        }
    ]
    main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])
    run = tmp_path / "lightning_logs" / "version_0"
    record = json.loads((run / "adapter" / ADAPTER_RECORD_JSON).read_text())["tutor"]
    assert record["calculator"] is True and record["annotated_training_data"] is True
    tutor = TutorModule(model_config=config["model"]["model_config"], adapter_path=str(run / "adapter"))
    assert tutor.calculator_enabled is True
    # Whatever the barely trained model writes, every annotation it opens is completed by the calculator.
    tokenizer_prompts = ["Ana has 7 apples and buys 5 more. How many apples does Ana have now?"] * 2
    for output in tutor.generate(tokenizer_prompts, max_new_tokens=24):
        for piece in output.split("<<")[1:]:
            if "=" in piece and calculate(piece.split("=", 1)[0]) is not None:
                assert piece.split("=", 1)[1].startswith(calculate(piece.split("=", 1)[0]) + ">>")
