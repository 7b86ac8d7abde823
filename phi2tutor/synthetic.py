"""The bundled, seeded generator of grade-school word problems: the offline default data set.

Problems come in English or Spanish, with a short step-by-step solution that ends in
"#### N" like GSM8K, so the same prompt, grading and report code runs on them and on GSM8K.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Literal

OPERATIONS = ("add", "sub", "mul")
LANGUAGES = ("en", "es")
SPLIT_NAMES = ("train", "val", "test")
SMALLEST_OPERAND = 2  # "1 bags" and "1 rows" read badly in both languages

_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}

NAMES = {
    "en": [
        "Ana",
        "Ben",
        "Carla",
        "David",
        "Emma",
        "Frank",
        "Grace",
        "Hugo",
        "Iris",
        "Jack",
        "Lily",
        "Max",
        "Nora",
        "Omar",
        "Paula",
        "Sam",
    ],
    "es": [
        "Ana",
        "Bruno",
        "Carmen",
        "Diego",
        "Elena",
        "Felipe",
        "Gabriela",
        "Hugo",
        "Inés",
        "Javier",
        "Lucía",
        "Mateo",
        "Nuria",
        "Óscar",
        "Paula",
        "Sofía",
    ],
}

# Spanish objects carry their grammatical gender: "¿Cuántas manzanas?" but "¿Cuántos lápices?".
OBJECTS = {
    "en": [
        ("apples", ""),
        ("pencils", ""),
        ("marbles", ""),
        ("stickers", ""),
        ("cookies", ""),
        ("books", ""),
        ("shells", ""),
        ("cards", ""),
        ("balloons", ""),
        ("oranges", ""),
        ("stamps", ""),
        ("candies", ""),
        ("flowers", ""),
        ("coins", ""),
        ("eggs", ""),
        ("toy cars", ""),
    ],
    "es": [
        ("manzanas", "f"),
        ("lápices", "m"),
        ("canicas", "f"),
        ("pegatinas", "f"),
        ("galletas", "f"),
        ("libros", "m"),
        ("conchas", "f"),
        ("cromos", "m"),
        ("globos", "m"),
        ("naranjas", "f"),
        ("sellos", "m"),
        ("caramelos", "m"),
        ("flores", "f"),
        ("monedas", "f"),
        ("huevos", "m"),
        ("cochecitos", "m"),
    ],
}

# The bundled tokenizer is trained on these texts: editing a template, name or object means rebuilding
# it and the demo base with scripts/build_demo_base.py (tests/test_tokenizer.py checks that they match).
# One-step templates per operation. {a} and {b} are the operands in the order the solution
# uses them; {q} is the Spanish "Cuántos/Cuántas" that agrees with the object.
_ONE_STEP = {
    "en": {
        "add": [
            "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
            "{name} had {a} {obj}. {friend} gave {name} {b} more. How many {obj} does {name} have now?",
            "There are {a} {obj} in a box and {name} puts in {b} more. How many {obj} are in the box now?",
            "{name} picked {a} {obj} in the morning and {b} in the afternoon. "
            "How many {obj} did {name} pick in all?",
        ],
        "sub": [
            "{name} has {a} {obj} and gives {b} to {friend}. How many {obj} does {name} have left?",
            "{name} had {a} {obj} and lost {b} of them. How many {obj} does {name} have now?",
            "There were {a} {obj} on the table. {name} took {b}. How many {obj} are on the table now?",
            "{name} put {a} {obj} on a tray and {friend} took {b}. How many {obj} are left on the tray?",
        ],
        "mul": [
            "{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?",
            "{name} buys {a} packs of {obj}. Each pack has {b} {obj}. How many {obj} does {name} buy?",
            "There are {a} rows of {obj} with {b} {obj} in each row. How many {obj} are there?",
            "{name} gives {b} {obj} to each of {a} friends. How many {obj} does {name} give away?",
        ],
    },
    "es": {
        "add": [
            "{name} tiene {a} {obj} y compra {b} más. ¿{q} {obj} tiene {name} ahora?",
            "{name} tenía {a} {obj}. {friend} le dio {b} más. ¿{q} {obj} tiene {name} ahora?",
            "En una caja hay {a} {obj} y {name} pone {b} más. ¿{q} {obj} hay en la caja ahora?",
            "{name} recogió {a} {obj} por la mañana y {b} por la tarde. ¿{q} {obj} recogió {name} en total?",
        ],
        "sub": [
            "{name} tiene {a} {obj} y le da {b} a {friend}. ¿{q} {obj} le quedan a {name}?",
            "{name} tenía {a} {obj} y perdió {b}. ¿{q} {obj} tiene {name} ahora?",
            "Había {a} {obj} en la mesa. {name} se llevó {b}. ¿{q} {obj} quedan en la mesa?",
            "{name} puso {a} {obj} en una bandeja y {friend} se llevó {b}. ¿{q} {obj} quedan en la bandeja?",
        ],
        "mul": [
            "{name} tiene {a} bolsas con {b} {obj} en cada bolsa. ¿{q} {obj} tiene {name}?",
            "{name} compra {a} paquetes de {obj}. Cada paquete trae {b} {obj}. ¿{q} {obj} compra {name}?",
            "Hay {a} filas de {obj} con {b} {obj} en cada fila. ¿{q} {obj} hay en total?",
            "{name} le da {b} {obj} a cada uno de sus {a} amigos. ¿{q} {obj} reparte {name}?",
        ],
    },
}

# Two-step templates keyed by (first operation, second operation); {a} op1 {b} = {s}, {s} op2 {c}.
_TWO_STEP = {
    "en": {
        ("add", "sub"): "{name} has {a} {obj}, buys {b} more and then gives {c} to {friend}. "
        "How many {obj} does {name} have now?",
        ("sub", "add"): "{name} has {a} {obj}, gives {b} to {friend} and then buys {c} more. "
        "How many {obj} does {name} have now?",
        ("add", "add"): "{name} picked {a} {obj} on Monday, {b} on Tuesday and {c} on Wednesday. "
        "How many {obj} did {name} pick in all?",
        ("sub", "sub"): "{name} had {a} {obj}. {name} gave {b} to {friend} and lost {c}. "
        "How many {obj} does {name} have left?",
        ("mul", "add"): "{name} buys {a} bags with {b} {obj} in each bag and already had {c} {obj}. "
        "How many {obj} does {name} have now?",
        ("mul", "sub"): "{name} buys {a} bags with {b} {obj} in each bag and gives {c} {obj} to {friend}. "
        "How many {obj} does {name} have left?",
    },
    "es": {
        ("add", "sub"): "{name} tiene {a} {obj}, compra {b} más y luego le da {c} a {friend}. "
        "¿{q} {obj} tiene {name} ahora?",
        ("sub", "add"): "{name} tiene {a} {obj}, le da {b} a {friend} y luego compra {c} más. "
        "¿{q} {obj} tiene {name} ahora?",
        ("add", "add"): "{name} recogió {a} {obj} el lunes, {b} el martes y {c} el miércoles. "
        "¿{q} {obj} recogió {name} en total?",
        ("sub", "sub"): "{name} tenía {a} {obj}. Le dio {b} a {friend} y perdió {c}. "
        "¿{q} {obj} le quedan a {name}?",
        ("mul", "add"): "{name} compra {a} bolsas con {b} {obj} en cada bolsa y ya tenía {c} {obj}. "
        "¿{q} {obj} tiene {name} ahora?",
        ("mul", "sub"): "{name} compra {a} bolsas con {b} {obj} en cada bolsa y le da {c} {obj} a {friend}. "
        "¿{q} {obj} le quedan a {name}?",
    },
}


@dataclass
class SyntheticSpec:
    """Size, language and difficulty of the bundled word-problem data set."""

    train_size: int = 2000
    """Number of training problems."""
    val_size: int = 64
    """Number of validation problems (held out: no question text shared with train or test)."""
    test_size: int = 200
    """Number of test problems (held out: no question text shared with train or val)."""
    language: Literal["en", "es"] = "en"
    """Language of the problems: "en" (English) or "es" (Spanish)."""
    max_operand: int = 10
    """Largest number that appears in a question (operands are drawn from 2..max_operand; an amount
    taken away can be 1 and is never more than what there is)."""
    operations: tuple[Literal["add", "sub", "mul"], ...] = field(default_factory=lambda: OPERATIONS)
    """Operations to use, any of "add", "sub", "mul"."""
    two_step_share: float = 0.0
    """Share of problems (0..1) that need two steps, e.g. buy some, then give some away."""
    name_count: int | None = None
    """How many different person names to use (None: all 16)."""
    object_count: int | None = None
    """How many different objects to use (None: all 16)."""
    calculator_annotations: bool = False
    """Write each step with a GSM8K calculator annotation, "7 * 12 = <<7*12=84>>84", so that a tutor trained
    on them calls the calculator at decoding time (TutorModule's calculator option)."""
    seed: int = 0
    """Random seed: the same seed and settings give the same problems."""


def generate_problems(
    n: int,
    seed: int = 0,
    *,
    language: str = "en",
    max_operand: int = 10,
    operations: tuple[str, ...] | list[str] = OPERATIONS,
    two_step_share: float = 0.0,
    name_count: int | None = None,
    object_count: int | None = None,
    calculator_annotations: bool = False,
) -> list[dict[str, str]]:
    """Return ``n`` distinct word problems as ``{"question", "answer"}`` rows, deterministically.

    The answer is one line per step ("7 + 5 = 12", or "7 + 5 = <<7+5=12>>12" with
    ``calculator_annotations``) and a final "#### 12"; every intermediate and final value is
    non-negative (subtraction never goes below zero). The annotations change only the answer text:
    the same seed gives the same questions and numbers with and without them.
    """
    _check_knobs(language, max_operand, operations, two_step_share, name_count, object_count)
    rng = random.Random(seed)
    names = NAMES[language][:name_count]
    objects = OBJECTS[language][:object_count]
    two_step_pairs = [pair for pair in _TWO_STEP[language] if set(pair) <= set(operations)]
    if two_step_share > 0 and not two_step_pairs:
        raise ValueError(
            f"two_step_share={two_step_share} needs two-step problems, but operations={tuple(operations)} "
            "allow none: two-step problems combine add/sub, or mul followed by add/sub. "
            "Add 'add' or 'sub' to operations, or set two_step_share=0."
        )
    seen_questions: set[str] = set()
    problems: list[dict[str, str]] = []
    # Rejection sampling of duplicates; the cap turns an impossible request into an error, not a hang.
    attempts_left = 50 * n + 1000
    while len(problems) < n:
        if attempts_left == 0:
            raise ValueError(
                f"Could not generate {n} distinct problems with max_operand={max_operand}, "
                f"operations={tuple(operations)}, name_count={name_count}, object_count={object_count}: "
                "ask for fewer problems or widen the knobs."
            )
        attempts_left -= 1
        two_step = bool(two_step_pairs) and rng.random() < two_step_share
        if two_step:
            pair = rng.choice(two_step_pairs)
            problem = _two_step_problem(rng, language, max_operand, pair, names, objects)
        else:
            problem = _one_step_problem(rng, language, max_operand, rng.choice(operations), names, objects)
        if problem["question"] not in seen_questions:
            seen_questions.add(problem["question"])
            if calculator_annotations:
                problem["answer"] = annotate_steps(problem["answer"])
            problems.append(problem)
    return problems


def generate_splits(spec: SyntheticSpec) -> dict[str, list[dict[str, str]]]:
    """Return {"train", "val", "test"} problem lists with no question text shared between splits.

    All splits come from one stream of distinct problems, test first, then val, then train, so the
    held-out sets stay the same when only ``train_size`` changes.
    """
    sizes = {"test": spec.test_size, "val": spec.val_size, "train": spec.train_size}
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"{split}_size must be >= 0, got {size}")
    problems = generate_problems(
        sum(sizes.values()),
        spec.seed,
        language=spec.language,
        max_operand=spec.max_operand,
        operations=tuple(spec.operations),
        two_step_share=spec.two_step_share,
        name_count=spec.name_count,
        object_count=spec.object_count,
        calculator_annotations=spec.calculator_annotations,
    )
    splits: dict[str, list[dict[str, str]]] = {}
    start = 0
    for split in ("test", "val", "train"):
        splits[split] = problems[start : start + sizes[split]]
        start += sizes[split]
    return {split: splits[split] for split in SPLIT_NAMES}


_STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$", re.MULTILINE)


def annotate_steps(answer: str) -> str:
    """ "7 * 12 = 84" lines written GSM8K's way, "7 * 12 = <<7*12=84>>84"; the "####" line is left as it is."""
    return _STEP.sub(lambda m: f"{m[1]} {m[2]} {m[3]} = <<{m[1]}{m[2]}{m[3]}={m[4]}>>{m[4]}", answer)


def final_answer(answer: str) -> int:
    """The number after "#### " in a generated answer (generated answers always have one)."""
    return int(answer.rsplit("####", 1)[1].strip())


def _check_knobs(
    language: str,
    max_operand: int,
    operations: tuple[str, ...] | list[str],
    two_step_share: float,
    name_count: int | None,
    object_count: int | None,
) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if max_operand < SMALLEST_OPERAND:
        raise ValueError(f"max_operand must be >= {SMALLEST_OPERAND}, got {max_operand}")
    unknown = [op for op in operations if op not in OPERATIONS]
    if not operations or unknown:
        raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {tuple(operations)}")
    if not 0.0 <= two_step_share <= 1.0:
        raise ValueError(f"two_step_share must be between 0 and 1, got {two_step_share}")
    for knob, value in (("name_count", name_count), ("object_count", object_count)):
        if value is not None and not 1 <= value <= 16:
            raise ValueError(f"{knob} must be between 1 and 16 (or None for all), got {value}")


def _apply(operation: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[operation]


def _fill(
    template: str, rng: random.Random, names: list[str], objects: list[tuple[str, str]], **numbers: int
) -> str:
    name = rng.choice(names)
    # A friend different from the person, when there is more than one name to choose from.
    friend = rng.choice([other for other in names if other != name] or names)
    obj, gender = rng.choice(objects)
    how_many = "Cuántas" if gender == "f" else "Cuántos"
    return template.format(name=name, friend=friend, obj=obj, q=how_many, **numbers)


def _one_step_problem(
    rng: random.Random,
    language: str,
    max_operand: int,
    operation: str,
    names: list[str],
    objects: list[tuple[str, str]],
) -> dict[str, str]:
    a = rng.randint(SMALLEST_OPERAND, max_operand)
    b = rng.randint(1, a) if operation == "sub" else rng.randint(SMALLEST_OPERAND, max_operand)
    result = _apply(operation, a, b)
    template = rng.choice(_ONE_STEP[language][operation])
    question = _fill(template, rng, names, objects, a=a, b=b)
    answer = f"{a} {_SYMBOL[operation]} {b} = {result}\n#### {result}"
    return {"question": question, "answer": answer}


def _two_step_problem(
    rng: random.Random,
    language: str,
    max_operand: int,
    pair: tuple[str, str],
    names: list[str],
    objects: list[tuple[str, str]],
) -> dict[str, str]:
    first_op, second_op = pair
    a = rng.randint(SMALLEST_OPERAND, max_operand)
    b = rng.randint(1, a) if first_op == "sub" else rng.randint(SMALLEST_OPERAND, max_operand)
    if first_op == "sub" and second_op == "sub" and a - b < 1:
        b = a - 1  # leave something to lose in the second step
    middle = _apply(first_op, a, b)
    c = (
        rng.randint(1, min(middle, max_operand))
        if second_op == "sub"
        else rng.randint(SMALLEST_OPERAND, max_operand)
    )
    result = _apply(second_op, middle, c)
    template = _TWO_STEP[language][pair]
    question = _fill(template, rng, names, objects, a=a, b=b, c=c)
    answer = (
        f"{a} {_SYMBOL[first_op]} {b} = {middle}\n{middle} {_SYMBOL[second_op]} {c} = {result}\n#### {result}"
    )
    return {"question": question, "answer": answer}
