"""Tests of the bundled word-problem generator: determinism, held-out splits, correct answers, knobs."""

import re

import pytest

from phi2tutor.synthetic import SyntheticSpec, final_answer, generate_problems, generate_splits

STEP = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")


def solve(answer: str) -> list[tuple[int, str, int, int]]:
    """The (a, op, b, result) steps of a generated answer, checked line by line."""
    *step_lines, final_line = answer.split("\n")
    steps = []
    for line in step_lines:
        match = STEP.match(line)
        assert match, f"not an arithmetic step: {line!r}"
        a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        assert result == {"+": a + b, "-": a - b, "*": a * b}[op]
        steps.append((a, op, b, result))
    assert final_line == f"#### {steps[-1][3]}"
    return steps


def test_same_seed_gives_same_problems_and_other_seed_differs():
    first = generate_problems(50, seed=3, two_step_share=0.3)
    assert first == generate_problems(50, seed=3, two_step_share=0.3)
    assert first != generate_problems(50, seed=4, two_step_share=0.3)


@pytest.mark.parametrize("language", ["en", "es"])
def test_answers_are_the_arithmetic_of_the_numbers_in_the_question(language):
    for problem in generate_problems(300, seed=0, language=language, two_step_share=0.5):
        steps = solve(problem["answer"])
        question_numbers = [int(n) for n in re.findall(r"\d+", problem["question"])]
        # The question's numbers are the operands, in order: a and b, then c for a second step.
        expected = [steps[0][0], steps[0][2]] + [step[2] for step in steps[1:]]
        if steps[0][1] == "*":  # "gives 4 to each of 6 friends" names the factors in either order
            question_numbers[:2] = sorted(question_numbers[:2], key=expected[:2].index)
        assert question_numbers == expected
        # Each later step starts from the previous result.
        for previous, step in zip(steps, steps[1:]):
            assert step[0] == previous[3]
        assert all(result >= 0 for *_, result in steps)
        assert final_answer(problem["answer"]) == steps[-1][3]


def test_splits_have_requested_sizes_and_share_no_question():
    splits = generate_splits(SyntheticSpec(train_size=500, val_size=40, test_size=60, seed=1))
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 500, "val": 40, "test": 60}
    questions = {name: {row["question"] for row in rows} for name, rows in splits.items()}
    assert len(questions["train"]) == 500  # no duplicates inside a split either
    assert not questions["train"] & questions["val"]
    assert not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]


def test_held_out_splits_do_not_move_when_train_size_changes():
    small = generate_splits(SyntheticSpec(train_size=10, val_size=20, test_size=30))
    large = generate_splits(SyntheticSpec(train_size=200, val_size=20, test_size=30))
    assert small["test"] == large["test"] and small["val"] == large["val"]


def test_spanish_problems_are_in_spanish():
    problems = generate_problems(100, seed=0, language="es", two_step_share=0.3)
    text = " ".join(problem["question"] for problem in problems)
    for word in ("¿Cuántos", "¿Cuántas", "tiene", "más", "ahora"):
        assert word in text
    for problem in problems:
        assert problem["question"].count("¿") == 1 and problem["question"].endswith("?")
    assert " How many " not in text


def test_difficulty_knobs_are_respected():
    problems = generate_problems(60, seed=0, max_operand=6, operations=("sub",), name_count=2, object_count=1)
    for problem in problems:
        steps = solve(problem["answer"])
        assert len(steps) == 1 and steps[0][1] == "-"
        assert max(int(n) for n in re.findall(r"\d+", problem["question"])) <= 6
        assert "apples" in problem["question"]  # the first object only
        assert problem["question"].split()[0] in {"Ana", "Ben", "There"}
    mixed = generate_problems(400, seed=0, two_step_share=0.25)
    two_step = sum(len(solve(problem["answer"])) == 2 for problem in mixed)
    assert 60 <= two_step <= 140
    assert all(len(solve(p["answer"])) == 2 for p in generate_problems(50, seed=0, two_step_share=1.0))


def test_bad_knobs_get_clear_errors():
    with pytest.raises(ValueError, match="operations"):
        generate_problems(5, operations=("div",))
    with pytest.raises(ValueError, match="max_operand"):
        generate_problems(5, max_operand=1)
    with pytest.raises(ValueError, match="two_step_share"):
        generate_problems(5, operations=("mul",), two_step_share=0.5)
    with pytest.raises(ValueError, match="distinct problems"):
        generate_problems(500, max_operand=2, operations=("add",), name_count=1, object_count=1)
