"""Calculator-assisted decoding: forced tokens per row in a batch equal single-row decoding (a scripted model,
the demo base, and a tutor trained on annotations), declined expressions leave the model's tokens alone, a
tutor trained a few steps on annotations writes ``<<a+b=`` and gets the calculator's result, the run and the
adapter directory record the calculator, and annotated bundled problems round-trip through grading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

from phi2tutor.calculator import calculate
from phi2tutor.calculator_decoding import (
    CalculatorCounts,
    CalculatorLogitsProcessor,
    equals_token_ids,
    forced_token_ids,
    open_expression,
)
from phi2tutor.data import CALCULATOR_ANNOTATION
from phi2tutor.grading import grade, reference_answer
from phi2tutor.keys import RUN_JSON
from phi2tutor.keys import TUTOR_SETTINGS_JSON as ADAPTER_RECORD_JSON
from phi2tutor.model import TutorModule
from phi2tutor.prompts import format_prompt
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
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# What a tutor writes for a one-step problem: "7 + 5 = <<7+5=12>>12".
ONE_STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = <<(\d+[-+*]\d+)=(-?\d+)>>")


@pytest.fixture(scope="module")
def demo_tutor() -> TutorModule:
    tutor = TutorModule(model_name_or_path=str(DEMO_BASE))
    tutor.configure_model()
    tutor.eval()
    return tutor


@pytest.fixture(scope="module")
def annotated_tutor(annotated_tutor_run: Path) -> TutorModule:
    from phi2tutor.tutor import load_tutor

    return load_tutor(annotated_tutor_run, device="cpu")


def held_out_one_step(count: int) -> list[dict[str, str]]:
    """One-step problems of the annotated tutor's test and validation splits (never trained on)."""
    spec = SyntheticSpec(
        train_size=0,
        val_size=16,
        test_size=16,
        max_operand=10,
        two_step_share=0.3,
        calculator_annotations=True,
    )
    splits = generate_splits(spec)
    one_step = [p for p in splits["test"] + splits["val"] if p["answer"].count("\n") == 1]
    assert len(one_step) >= count
    return one_step[:count]


# ------------------------------------------------------------------------------------- a scripted model
def scripted_decode(tokenizer, scripts: list[str]) -> tuple[list[str], CalculatorCounts]:
    """Greedy decoding, through the processor, of a "model" that writes its script token by token whatever
    came before: where the calculator forces tokens they replace the script's, which then goes on."""
    scripted = [tokenizer.encode(script) for script in scripts]
    prompt_width = 2
    input_ids = torch.full((len(scripts), prompt_width), tokenizer.eos_token_id)
    processor = CalculatorLogitsProcessor(tokenizer, prompt_width, equals_token_ids(tokenizer))
    for step in range(max(len(tokens) for tokens in scripted)):
        scores = torch.zeros(len(scripts), len(tokenizer))
        for row, tokens in enumerate(scripted):
            scores[row, tokens[step] if step < len(tokens) else tokenizer.eos_token_id] = 1.0
        chosen = processor(input_ids, scores).argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, chosen], dim=1)
    texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
    return texts, processor.counts


def test_forced_queues_per_row_in_a_batch_equal_single_rows(demo_tutor: TutorModule) -> None:
    """Rows call the calculator at different steps, twice in one row, never in another, or get declined; each
    row's text is exactly its single-row text, and the counts are the sum of the rows'."""
    tokenizer = demo_tutor.tokenizer
    # Wrong results of the right token count, so that the script stays aligned after a forced result.
    scripts = [
        "3 * 4 = <<3*4=99>>99 and 99 + 5 = <<99+5=777>>777 so",
        "no annotation in this row at all, just words and more words",
        "5 / 0 = <<5/0=7>>7 then",
        "<<2+2=4>>4 right",
        "a <<1,000*3=1234>>1234",
    ]
    expected = [
        "3 * 4 = <<3*4=12>>99 and 99 + 5 = <<99+5=104>>777 so",
        scripts[1],
        scripts[2],  # division by zero: declined, the script's own tokens
        scripts[3],  # the script already wrote the calculator's result: forced, but nothing changed
        "a <<1,000*3=3000>>1234",
    ]
    batched, counts = scripted_decode(tokenizer, scripts)
    assert batched == expected
    singles = [scripted_decode(tokenizer, [script]) for script in scripts]
    assert [texts[0] for texts, _ in singles] == expected
    assert [(c.calls, c.changed, c.declined) for _, c in singles] == [
        (2, 2, 0),
        (0, 0, 0),
        (0, 0, 1),
        (1, 0, 0),
        (1, 1, 0),
    ]
    assert (counts.calls, counts.changed, counts.declined) == (4, 3, 1)


# ------------------------------------------------------------------------------------- the demo base
def _decode(tutor: TutorModule, prompts: list[str], calculator: bool, tail: int = TAIL):
    """Greedy generate of raw prompts (left-padded), with the calculator reading the last ``tail`` prompt
    tokens and everything generated."""
    tokenizer = tutor.tokenizer
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    processor = CalculatorLogitsProcessor(
        tokenizer, encoded["input_ids"].shape[1] - tail, equals_token_ids(tokenizer)
    )
    with torch.no_grad():
        output = tutor.model.generate(
            **encoded,
            max_new_tokens=40 if tail == 0 else 10,
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
    # The bundled tokenizer writes digits one by one, as in training: the forced tokens are the training ones.
    assert [tokenizer.decode([i]) for i in ids] == ["8", "1", "6", ">", ">"]
    # ... and the tokens the same annotation has in a training answer ("<<7*12=84>>84").
    ids_84 = forced_token_ids(tokenizer, "7 * 12 = <<7*12=", "84")
    assert tokenizer.encode("7 * 12 = <<7*12=84>>84")[-len(ids_84) - 2 : -2] == ids_84


def test_generate_counts_and_switch(demo_tutor: TutorModule) -> None:
    questions = ["Ana has 7 apples and buys 5 more. How many apples does Ana have now?"]
    assert demo_tutor.calculator_enabled is False  # no annotated data, no adapter record
    plain = demo_tutor.generate(questions, max_new_tokens=8)
    assert demo_tutor.last_calculator_counts is None
    # The untouched base never opens an annotation: the calculator is on but has nothing to do.
    assert demo_tutor.generate(questions, max_new_tokens=8, calculator=True) == plain
    assert demo_tutor.last_calculator_counts == CalculatorCounts(calls=0, changed=0, declined=0)


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


# -------------------------------------------------------------------- annotated bundled problems
@pytest.mark.parametrize("language", ["en", "es"])
def test_annotated_problems_round_trip_through_grading(language: str) -> None:
    spec = SyntheticSpec(
        train_size=40, val_size=0, test_size=0, language=language, max_operand=999, two_step_share=0.5
    )
    plain = generate_splits(spec)["train"]
    annotated = generate_splits(SyntheticSpec(**{**spec.__dict__, "calculator_annotations": True}))["train"]
    assert [p["question"] for p in plain] == [p["question"] for p in annotated]
    assert annotated[0]["answer"] == annotate_by_hand(plain[0]["answer"])
    for before, after in zip(plain, annotated):
        lines = after["answer"].splitlines()
        assert all("<<" in line for line in lines[:-1]) and lines[-1].startswith("####")
        # Every annotation is what the calculator gives, and the line goes on with that result.
        for line in lines[:-1]:
            expression, result = ANNOTATION.search(line).groups()
            assert calculate(expression) == result and line.endswith(f">>{result}")
        # MathDataModule without keep_calculator_annotations strips them back to the plain answer.
        assert CALCULATOR_ANNOTATION.sub("", after["answer"]) == before["answer"]
        assert reference_answer(after["answer"]) == str(final_answer(before["answer"]))
        assert grade(after["answer"], before["answer"]).correct
        assert grade(before["answer"], after["answer"]).correct


def annotate_by_hand(answer: str) -> str:
    """GSM8K's way, written out independently of synthetic.annotate_steps."""
    lines = []
    for line in answer.splitlines():
        if line.startswith("####"):
            lines.append(line)
            continue
        left, result = line.split(" = ")
        lines.append(f"{left} = <<{left.replace(' ', '')}={result}>>{result}")
    return "\n".join(lines)


# ----------------------------------------------------------------- a tutor trained on annotations
def test_fit_on_annotated_data_turns_the_calculator_on_and_reports_it(annotated_tutor_run: Path) -> None:
    from phi2tutor.events import read_scalars
    from phi2tutor.keys import CALCULATOR_CALLS_KEY, CALCULATOR_CHANGED_KEY

    record = json.loads((annotated_tutor_run / "adapter" / ADAPTER_RECORD_JSON).read_text())["tutor"]
    assert record["calculator"] is True and record["annotated_training_data"] is True
    assert json.loads((annotated_tutor_run / RUN_JSON).read_text())["calculator"] == {
        "enabled": True,
        "annotated_training_data": True,
    }
    # MathAnswerEval graded its 8 problems at fit end with the calculator and logged what it did.
    scalars = read_scalars(annotated_tutor_run)
    (_, calls), (_, changed) = scalars[CALCULATOR_CALLS_KEY][-1], scalars[CALCULATOR_CHANGED_KEY][-1]
    assert calls >= 8 and 1 <= changed <= calls
    markdown = (annotated_tutor_run / "report.md").read_text()
    assert (
        f"- Calculator: on (each `<<expression=` the tutor wrote was completed by phi2tutor.calculator); at the "
        f"last evaluation (epoch 3) it completed {calls:.0f} annotations, {changed:.0f} of which changed the "
        "model's own tokens\n"
    ) in markdown


def test_trained_tutor_writes_annotations_and_gets_the_calculators_result(
    annotated_tutor: TutorModule,
) -> None:
    problems = held_out_one_step(12)
    questions = [problem["question"] for problem in problems]
    assert annotated_tutor.calculator_enabled is True  # from the adapter's record
    with_calculator = annotated_tutor.generate(questions)
    counts = annotated_tutor.last_calculator_counts
    without = annotated_tutor.generate(questions, calculator=False)
    changed = 0
    for problem, output, own in zip(problems, with_calculator, without):
        # The tutor writes "a + b = <<a+b=" itself (copying its operands is its own business); the result in
        # the annotation is the calculator's.
        match = ONE_STEP.match(output)
        assert match, (problem["question"], output)
        expression, result = match[4], match[5]
        assert result == calculate(expression)
        own_match = ONE_STEP.match(own)
        assert own_match and own_match[4] == expression  # the same tokens up to the "=" it forced after
        changed += own_match[5] != result
    assert counts.calls == len(problems) and counts.declined == 0
    # Its own results inside the annotations are mostly wrong: the calculator changed them, and said so.
    assert counts.changed == changed >= len(problems) // 2


def test_trained_tutor_batch_with_some_rows_calling_equals_single_rows(annotated_tutor: TutorModule) -> None:
    template = annotated_tutor.hparams.prompt_template
    questions = [problem["question"] for problem in held_out_one_step(3)]
    prompts = [format_prompt(template, question) for question in questions]
    # A row whose answer is already written up to "####": it ends without opening an annotation.
    prompts.insert(1, format_prompt(template, questions[0]) + " 7 * 8 = <<7*8=56>>56\n####")
    batched, counts = _decode(annotated_tutor, prompts, calculator=True, tail=0)
    singles = [_decode(annotated_tutor, [prompt], calculator=True, tail=0) for prompt in prompts]
    assert batched == [texts[0] for texts, _ in singles]
    assert [c.calls for _, c in singles] == [1, 0, 1, 1]
    assert "<<" not in batched[1]
    assert counts.calls == 3 and counts.changed == sum(c.changed for _, c in singles) >= 1
    # The same texts as TutorModule.generate's (length-sorted batches), which the rows without the "####"
    # prompt are.
    assert annotated_tutor.generate([questions[0], questions[1], questions[2]]) == [
        batched[0].strip(),
        batched[2].strip(),
        batched[3].strip(),
    ]
