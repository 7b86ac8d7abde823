"""Final-answer grading: extract the answer from a solution text, compare it with the reference numerically.

One source of truth for the MathAnswerEval callback, ``phi2tutor validate`` and ``phi2tutor score``; the
rules follow lm-evaluation-harness's gsm8k task. Pure Python: no torch import, so ``phi2tutor score`` starts at once
(the torchmetrics metric that sums grades across processes is phi2tutor.metrics.MathAnswerAccuracy).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

from phi2tutor.errors import Phi2TutorError
from phi2tutor.files import read_text, text_lines

# lm-evaluation-harness gsm8k, kept verbatim for reference; the patterns used below are supersets of these
# (they also keep a "/denominator" so that "1/2" is not read as "2", and accept "####72" and "#### $72").
LM_EVAL_STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
LM_EVAL_FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"

_STRICT = re.compile(r"####\s*\$?\s*(-?[0-9.,]+(?:/[0-9]+)?)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,}(?:/[0-9]+)?)|(-?[0-9]+(?:/[0-9]+)?)")
# A number as written in prose: sign, currency, digits with separators, optional "/denominator".
_NUMBER_IN_TEXT = r"-?\s?\$?\s?-?(?:[0-9][0-9.,]*|\.[0-9]+)(?:\s?/\s?[0-9]+)?"
_NUMBER_TOKEN = re.compile(_NUMBER_IN_TEXT)
_ANSWER_IS = r"(?:the\s+(?:final\s+)?answer\s+is|la\s+respuesta\s+(?:final\s+)?es)\s*[:=]?\s*"
_THE_ANSWER_IS = re.compile(_ANSWER_IS + "(" + _NUMBER_IN_TEXT + ")", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^\s*(?:A|Answer|Respuesta)\s*:\s*(.+?)\s*$", re.IGNORECASE)
_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")

# Plain decimal after separators are resolved: "-12", "12.", "12.5", ".5".
_PLAIN_DECIMAL = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
# "1.234" or "12.345.678": dots that can only be thousands separators in a decimal-comma locale.
_DOT_THOUSANDS = re.compile(r"-?[0-9]{1,3}(?:\.[0-9]{3})+")


def _clean(text: str) -> str:
    """Drop what never changes a number's value: spaces, currency and percent signs, trailing punctuation."""
    text = text.replace("\u2212", "-").replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    text = text.replace("\\,", "").replace("\\!", "")
    # Spaces go only around signs, so "1 2" stays two numbers rather than becoming 12.
    text = re.sub(r"\s*([$€%/-])\s*", r"\1", text.strip())
    text = re.sub(r"[$€%]", "", text)
    # A leading "+" is a sign, not part of the digits; "-$5" and "$-5" both end as "-5" above.
    text = text.removeprefix("+")
    return text.rstrip(".,;:!?")


def _parse_plain(text: str, decimal_comma: bool) -> Fraction | None:
    """Parse an already cleaned number without fractions; None when it is not exactly one number."""
    if decimal_comma:
        if "," in text and "." in text:
            # Both marks: the last one is the decimal mark ("1.234,5", but also an English "1,200.50").
            decimal_mark = "," if text.rfind(",") > text.rfind(".") else "."
            thousands_mark = "." if decimal_mark == "," else ","
            if text.count(decimal_mark) > 1:
                return None
            text = text.replace(thousands_mark, "").replace(decimal_mark, ".")
        elif "," in text:
            if text.count(",") > 1:
                return None
            text = text.replace(",", ".")
        elif _DOT_THOUSANDS.fullmatch(text):
            # "1.500" is fifteen hundred in Spanish; a lone "2.5" is still read as two and a half.
            text = text.replace(".", "")
    else:
        # As lm-eval does: every comma is a thousands separator ("1,234" -> 1234, and so "2,5" -> 25).
        text = text.replace(",", "")
    if not _PLAIN_DECIMAL.fullmatch(text):
        return None
    try:
        return Fraction(Decimal(text))
    except (InvalidOperation, ValueError):
        return None


def _parse_clean(text: str, decimal_comma: bool) -> Fraction | None:
    if text.count("/") == 1:
        numerator, denominator = (_parse_plain(part, decimal_comma) for part in text.split("/"))
        if numerator is None or denominator is None or denominator == 0:
            return None
        return numerator / denominator
    return _parse_plain(text, decimal_comma)


def parse_number(text: str, decimal_comma: bool = False) -> Fraction | None:
    """Read the number a short answer text stands for, exactly, or None when there is none.

    Ignores thousands separators, "$", "€", "%", a trailing period and LaTeX spacing; reads "a/b" as a
    fraction, so "18.00" == "18" and "1/2" == "0.5". When words surround the number ("18 dollars",
    "about $1,200.") the text's single number is taken; several numbers are ambiguous and give None.

    Args:
        text: the answer text, e.g. "$1,234.50", "-3", "1/2", "18 dollars".
        decimal_comma: read "," as the decimal mark and "." as the thousands separator ("2,5" is 2.5,
            "1.234,5" is 1234.5); a lone "2.5" still reads as 2.5, "1.500" as 1500, and when both marks
            appear the last one is the decimal mark. Off, every comma is a thousands separator (lm-eval).
    """
    value = _parse_clean(_clean(text), decimal_comma)
    if value is not None:
        return value
    tokens = _NUMBER_TOKEN.findall(text.replace("\u2212", "-"))
    if len(tokens) != 1:
        return None
    return _parse_clean(_clean(tokens[0]), decimal_comma)


def _accepted(candidate: str, decimal_comma: bool) -> str | None:
    """The candidate, cleaned, if it reads as a number; an extraction rule only fires on real numbers."""
    cleaned = _clean(candidate)
    if _parse_clean(cleaned, decimal_comma) is not None:
        return cleaned
    tokens = _NUMBER_TOKEN.findall(candidate)
    if len(tokens) == 1 and _parse_clean(_clean(tokens[0]), decimal_comma) is not None:
        return _clean(tokens[0])
    return None


def _last_boxed_content(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces matched, so \\boxed{\\frac{1}{2}} keeps its fraction."""
    starts = list(_BOXED_START.finditer(text))
    if not starts:
        return None
    start = starts[-1].end()
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return None


def _latex_to_plain(text: str) -> str:
    text = _LATEX_TEXT.sub("", text)
    text = _LATEX_FRACTION.sub(r"\1/\2", text)
    text = text.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\left", "").replace("\\right", "")
    return text.replace("{", "").replace("}", "")


def extract_answer(text: str, decimal_comma: bool = False) -> str | None:
    """Find the final answer in a generated solution; None when it states no number at all (invalid).

    Rules, first that finds a number wins:
    1. "#### N", the first one (lm-eval gsm8k strict-match, which takes the first match: a model that
       runs on into a new made-up problem writes its real answer first);
    2. "The answer is N" (also "The final answer is", "La respuesta es"), the last one;
    3. a last non-blank line "A: N" (also "Answer:", "Respuesta:");
    4. the last "\\boxed{N}" (LaTeX fractions such as \\frac{1}{2} become "1/2");
    5. the last number anywhere (lm-eval gsm8k flexible-extract, its regex's last match).

    Returns the number as written, without "$", "%", spaces or a trailing period ("1,234", "-3", "1/2"),
    so that tables show what the model wrote; compare it with :func:`answers_match`.

    Args:
        text: the generated solution.
        decimal_comma: read "," as the decimal mark (see :func:`parse_number`).
    """
    text = text.replace("\u2212", "-")
    for match in _STRICT.finditer(text):
        if (found := _accepted(match.group(1), decimal_comma)) is not None:
            return found
    for match in reversed(list(_THE_ANSWER_IS.finditer(text))):
        if (found := _accepted(match.group(1), decimal_comma)) is not None:
            return found
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and (line_match := _ANSWER_LINE.match(lines[-1])):
        if (found := _accepted(line_match.group(1), decimal_comma)) is not None:
            return found
    boxed = _last_boxed_content(text)
    if boxed is not None and (found := _accepted(_latex_to_plain(boxed), decimal_comma)) is not None:
        return found
    # Walk back from the last match: lm-eval would return a "..." ellipsis here, which is no number.
    for match in reversed(list(_FLEXIBLE.finditer(text))):
        candidate = match.group(1) or match.group(2)
        if (found := _accepted(candidate, decimal_comma)) is not None:
            return found
    return None


def reference_answer(answer_text: str, decimal_comma: bool = False) -> str | None:
    """The reference's final answer: what follows the last "####" of a GSM8K solution, or a bare number.

    Returns None when the text has neither (a full solution without "####" is not guessed at), and when
    what follows "####" is not a number ("#### seven"): a reference must be gradable numerically. The same
    rule decides which training rows are valid (phi2tutor.data) and which ``score`` references are.

    Args:
        answer_text: a GSM8K-style solution "... #### 72", or just "72" / "$1,200".
        decimal_comma: read "," as the decimal mark (see :func:`parse_number`).
    """
    if "####" in answer_text:
        final = answer_text.rsplit("####", 1)[1].strip()
        if not final or parse_number(final, decimal_comma) is None:
            return None
        return final
    if parse_number(answer_text, decimal_comma) is not None:
        return answer_text.strip()
    return None


def _normalized_words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s/.-]", " ", text.casefold()).split()).rstrip(".")


def answers_match(predicted: str | None, reference: str | None, decimal_comma: bool = False) -> bool:
    """Whether two final answers are equal: numerically when both are numbers, else as normalized words.

    "18.00" == "18", "1/2" == "0.5", "$1,200" == "1200", "-3" != "3". decimal_comma applies to both texts
    (a Spanish data set writes its references the way its tutor should answer).
    """
    if predicted is None or reference is None:
        return False
    predicted_value = parse_number(predicted, decimal_comma)
    reference_value = parse_number(reference, decimal_comma)
    if predicted_value is not None and reference_value is not None:
        return predicted_value == reference_value
    if predicted_value is None and reference_value is None:
        # Non-numeric answers ("yes", "x = y") still compare, without case or punctuation.
        return bool(_normalized_words(predicted)) and _normalized_words(predicted) == _normalized_words(
            reference
        )
    return False


@dataclass
class GradedAnswer:
    """The grade of one generated solution against its reference."""

    extracted: str | None
    """The final answer found in the generation; None when it states none."""
    reference: str
    """The reference's final answer."""
    correct: bool
    """The extracted answer equals the reference."""
    invalid: bool
    """No answer could be found; counted apart from wrong answers."""


def grade(generation: str, reference_text: str, decimal_comma: bool = False) -> GradedAnswer:
    """Grade one generated solution against a reference solution ("... #### 72") or a bare number.

    Raises:
        ValueError: the reference states no final answer (a data error, not a model error).
    """
    reference = reference_answer(reference_text, decimal_comma)
    if reference is None:
        raise ValueError(
            f"The reference {reference_text[-80:]!r} has no final answer: it needs '#### N' or a bare number."
        )
    extracted = extract_answer(generation, decimal_comma)
    return GradedAnswer(
        extracted=extracted,
        reference=reference,
        correct=answers_match(extracted, reference, decimal_comma),
        invalid=extracted is None,
    )


def read_jsonl(
    path: str | os.PathLike[str],
    required_fields: Sequence[str],
    what: str,
    field_hints: Mapping[str, str] | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Read a .jsonl file of objects as (line number, row) pairs, blank lines skipped.

    Args:
        path: the file.
        required_fields: fields every row must have.
        what: what the file holds, for messages ("predictions", "problems").
        field_hints: per field, what the user can do instead of adding it (e.g. name the option that
            says which field holds it).

    Raises:
        Phi2TutorError: the file cannot be read, a line is not a JSON object or lacks a field; the message
            names the file and the line.
    """
    path = Path(path)
    example = json.dumps({field: "..." for field in required_fields})
    lines = text_lines(read_text(path, what, f"JSON Lines, one object per line such as {example}"))
    rows: list[tuple[int, dict[str, Any]]] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise Phi2TutorError(
                f"{path}, line {line_number}: not valid JSON ({error.msg}, column {error.colno}). Every "
                f"non-blank line of the {what} file must be one JSON object such as {example}; fix or "
                f"delete that line and run again."
            ) from None
        if not isinstance(row, dict):
            raise Phi2TutorError(
                f"{path}, line {line_number}: a JSON {type(row).__name__}, not an object. Every non-blank "
                f"line of the {what} file must be one JSON object such as {example}; fix or delete that "
                f"line and run again."
            )
        for field in required_fields:
            if field not in row:
                present = ", ".join(repr(key) for key in row) or "none"
                hint = (field_hints or {}).get(field)
                raise Phi2TutorError(
                    f"{path}, line {line_number}: no field {field!r} (fields there: {present}). Every row "
                    f"of the {what} file needs it"
                    + (f"; if it is stored under another name, {hint}." if hint else ".")
                )
        rows.append((line_number, row))
    return rows


def score_predictions(
    path: str | os.PathLike[str],
    prediction_field: str = "prediction",
    reference_field: str = "answer",
    decimal_comma: bool = False,
) -> tuple[dict[str, float | int], list[dict[str, Any]]]:
    """Grade a .jsonl file of model outputs, one object per line with an output and a reference answer.

    Returns:
        A summary {"accuracy", "correct", "wrong", "invalid", "total"} (wrong excludes invalid; accuracy is
        correct/total) and one dict per row: line, extracted, reference, correct,
        invalid.

    Raises:
        Phi2TutorError: the file is missing or holds no rows, a line is not a JSON object, a row lacks a
            field or its reference has no final number; the message names the file and line.
    """
    field_hints = {
        prediction_field: f"set prediction_field to that name (now {prediction_field!r})",
        reference_field: f"set reference_field to that name (now {reference_field!r})",
    }
    rows = read_jsonl(path, [prediction_field, reference_field], "predictions", field_hints)
    graded_rows: list[dict[str, Any]] = []
    for line_number, row in rows:
        prediction = _as_text(row[prediction_field], path, line_number, prediction_field, allow_null=True)
        reference_text = _as_text(row[reference_field], path, line_number, reference_field, allow_null=False)
        try:
            graded = grade(prediction, reference_text, decimal_comma)
        except ValueError:
            raise Phi2TutorError(
                f"{path}, line {line_number}: the reference {reference_field!r} ({reference_text[-60:]!r}) "
                f"states no final number. It must end in '#### N' with N a number (GSM8K style) or be a "
                f"bare number; fix the row, or set reference_field to the field that holds the reference."
            ) from None
        graded_rows.append(
            {
                "line": line_number,
                "extracted": graded.extracted,
                "reference": graded.reference,
                "correct": graded.correct,
                "invalid": graded.invalid,
            }
        )
    if not graded_rows:
        raise Phi2TutorError(
            f"The predictions file {path} holds no rows (it is empty or blank), so there is nothing to grade. "
            f"Give a JSON Lines file with one object per line holding {prediction_field!r} and "
            f"{reference_field!r}, e.g. the predictions.jsonl that phi2tutor predict writes."
        )
    total = len(graded_rows)
    correct = sum(row["correct"] for row in graded_rows)
    invalid = sum(row["invalid"] for row in graded_rows)
    summary: dict[str, float | int] = {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "wrong": total - correct - invalid,
        "invalid": invalid,
        "total": total,
    }
    return summary, graded_rows


def main_score(argv: list[str]) -> None:
    """``phi2tutor score PREDICTIONS.jsonl``: print the accuracy of a predictions file, and which lines
    were wrong or invalid with --details. Errors in the file raise Phi2TutorError (the CLI prints them)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="phi2tutor score",
        description="Grade a .jsonl file of model outputs against reference answers, with the same answer "
        "extraction as training (lm-eval gsm8k rules). Prints accuracy, correct, wrong and invalid.",
    )
    parser.add_argument("path", help="JSON Lines file, one object per line with an output and a reference.")
    parser.add_argument("--prediction_field", default="prediction", help="Field holding the model output.")
    parser.add_argument(
        "--reference_field", default="answer", help='Field holding the reference ("... #### 72" or "72").'
    )
    parser.add_argument(
        "--decimal_comma", action="store_true", help='Read "," as the decimal mark ("2,5" is 2.5).'
    )
    parser.add_argument("--details", action="store_true", help="Also list every wrong or invalid line.")
    parser.add_argument("--json", action="store_true", help="Print the summary as one JSON object.")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="Also write every row's grade as JSON lines: line, extracted, reference, correct, invalid.",
    )
    args = parser.parse_args(argv)
    summary, rows = score_predictions(
        args.path, args.prediction_field, args.reference_field, args.decimal_comma
    )
    if args.output:
        write_graded_rows(args.output, rows)
    if args.details:
        for row in rows:
            if not row["correct"]:
                outcome = "invalid (no answer found)" if row["invalid"] else f"wrong: {row['extracted']}"
                print(f"line {row['line']}: {outcome}, reference {row['reference']}")
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{args.path}: accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['total']} "
            f"correct, {summary['wrong']} wrong, {summary['invalid']} invalid: no answer found)"
        )


def write_graded_rows(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Write per-row grades (score_predictions' rows) as JSON lines, in the input's order."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as error:
        raise Phi2TutorError(
            f"Cannot write the per-row results to {path}: {error.strerror or error}. Give --output a path in "
            "a directory you can write to."
        ) from None
    return path


def _as_text(value: Any, path: str | os.PathLike[str], line_number: int, field: str, allow_null: bool) -> str:
    """A row's field as text: numbers are fine (a stored 72 is "72"); a null output is an empty one."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if value is None and allow_null:
        return ""
    raise Phi2TutorError(
        f"{path}, line {line_number}: field {field!r} is {json.dumps(value)[:60]}, not text. It must be a "
        f"string (or a number); fix the row."
    )
