"""phi2tutor.calculator: exact results on tricky expressions, written as GSM8K writes them, and declines
(None) for everything outside what it accepts."""

from __future__ import annotations

from fractions import Fraction

import pytest

from phi2tutor.calculator import (
    MAX_EXPRESSION_CHARS,
    annotated_data,
    calculate,
    evaluate,
    format_result,
)
from phi2tutor.synthetic import SyntheticSpec


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # precedence and parentheses
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        ("10-4-3", "3"),
        ("100/10/5", "2"),
        ("2*(3+(4-1))/3", "4"),
        # decimals, written without trailing zeros and with a leading zero
        ("1.20*4", "4.8"),
        ("2*20*.01", "0.4"),
        ("0.1+0.2", "0.3"),
        ("7-4.2-2.05", "0.75"),
        ("37/40", "0.925"),
        ("10/4", "2.5"),
        ("3.5*2", "7"),
        # a result that does not come out exact: four decimals, rounded half up
        ("10/3", "3.3333"),
        ("2/3", "0.6667"),
        ("1/8000", "0.0001"),
        # negatives: results, a leading minus, a minus after an operator
        ("3-10", "-7"),
        ("-5+2", "-3"),
        ("-(2+3)*2", "-10"),
        ("4*-2", "-8"),
        ("-1.5/3", "-0.5"),
        # percent: hundredths of the number or group before it
        ("50%*10", "5"),
        ("20%*120", "24"),
        ("200/50%", "400"),
        ("(10+15)%*8", "2"),
        ("5%", "0.05"),
        # thousands separators and spaces
        ("1,000*3", "3000"),
        ("2,500,000/1,000", "2500"),
        (" 7 * 12 ", "84"),
        ("48*17", "816"),
    ],
)
def test_calculates_gsm8k_style_results(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "5/0",  # division by zero
        "5/(2-2)",
        "5/0%",
        "2**10",  # exponent attempts
        "2^3",
        "1e5",
        "7//2",  # floor division, modulo
        "50 % 3",
        "x+1",  # letters, names, calls
        "2x",
        "abs(-3)",
        "__import__('os')",
        "1 2",  # two numbers in a row, implicit products
        "2(3)",
        "(1+2",  # unbalanced
        "1+2)",
        "1,00*3",  # not a thousands separator
        "1,5",
        "",  # nothing
        "   ",
        "3 == 3",  # comparison
        "%5",
        "1" * 16,  # a number over 15 digits
        "999999999999999*10",  # a result over the magnitude limit
        "+".join(["1"] * (MAX_EXPRESSION_CHARS // 2 + 1)),  # too long
    ],
)
def test_declines_what_it_does_not_accept(expression: str) -> None:
    assert calculate(expression) is None


def test_values_are_exact_fractions() -> None:
    assert evaluate("0.1*3") == Fraction(3, 10)
    assert evaluate("1/3*3") == 1
    assert calculate("1/3*3") == "1"


def test_format_result() -> None:
    assert format_result(Fraction(816)) == "816"
    assert format_result(Fraction(-7)) == "-7"
    assert format_result(Fraction(1, 2)) == "0.5"
    assert format_result(Fraction(-1, 100000)) == "0"  # rounds to zero: no "-0"
    assert format_result(Fraction(123456789, 1000)) == "123456.789"


def test_annotated_data_follows_either_option() -> None:
    assert annotated_data(True, "files", None) is True
    assert annotated_data(False, "files", SyntheticSpec(calculator_annotations=True)) is False
    assert annotated_data(False, "synthetic", SyntheticSpec(calculator_annotations=True)) is True
    assert annotated_data(False, "synthetic", {"calculator_annotations": True}) is True
    assert annotated_data(False, "synthetic", SyntheticSpec()) is False
    assert annotated_data(False, "synthetic", None) is False
