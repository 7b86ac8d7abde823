"""The safe calculator behind calculator-assisted decoding: evaluates the expression of a GSM8K annotation
(``<<48*17=816>>``) by walking Python's ast (never eval), exactly (fractions), within limits, and writes
the result the way GSM8K writes it. Pure: no torch import.

Accepted: numbers (integers, decimals such as ``.5`` or ``2.50``, thousands separators ``1,000``), a
leading minus, ``+ - * /``, parentheses, spaces, and ``%`` after a number or a parenthesis, meaning
"hundredths" (``50%*10`` is 5). GSM8K's own annotations never use ``%`` (its 23,716 train annotations
write ``20*.01``), but their text does ("2 liters * 20% = <<2*20*.01=.4>>"), so a model that writes
``<<20%*2=`` means 0.4, never a remainder. Anything else (letters, ``**``, ``^``, ``//``, comparisons),
division by zero, or a number, result or expression over the limits: ``evaluate`` returns None and the
model's own tokens continue.
"""

from __future__ import annotations

import ast
import re
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

MAX_EXPRESSION_CHARS = 100
"""Longest expression evaluated (GSM8K train's longest is 30 characters)."""
MAX_NUMBER_DIGITS = 15
"""Most digits in one number of the expression."""
MAX_MAGNITUDE = 10**15
"""Largest absolute value of any number, intermediate or result (GSM8K train's largest result: 2.92e9)."""
MAX_DECIMALS = 4
"""Decimals of a result that does not come out exact (10/3 -> 3.3333); GSM8K train's results have at
most 3, and every one of them is written exactly at this setting."""

# A number as written: digits with optional thousands groups and decimals, or a bare ".5".
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_TOKEN = re.compile(rf"\s*(?:(?P<number>{_NUMBER})|(?P<symbol>[-+*/()%]))")


def evaluate(expression: str) -> Fraction | None:
    """The exact value of ``expression``, or None when the calculator declines it (see the module docstring)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    source = _python_source(expression)
    if source is None:
        return None
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError):
        return None
    try:
        return _value(tree.body, source)
    except _Declined:
        return None


def calculate(expression: str) -> str | None:
    """The result of ``expression`` written as GSM8K writes it (``816``, ``0.4``, ``-7``), or None."""
    value = evaluate(expression)
    return None if value is None else format_result(value)


def format_result(value: Fraction) -> str:
    """An integer without ".0"; otherwise the shortest decimal, rounded half up to MAX_DECIMALS places."""
    if value.denominator == 1:
        return str(value.numerator)
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    rounded = exact.quantize(Decimal(1).scaleb(-MAX_DECIMALS), rounding=ROUND_HALF_UP)
    text = format(rounded, "f").rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class _Declined(Exception):
    """Raised inside the walk: the expression is outside what the calculator accepts."""


def _python_source(expression: str) -> str | None:
    """The expression as Python source with plain numbers (no separators) and percent as ``/100``; None
    when a character or a ``%`` is outside the accepted forms."""
    tokens: list[str] = []
    position = 0
    expression = expression.rstrip()
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if match is None:
            return None
        position = match.end()
        number, symbol = match.group("number"), match.group("symbol")
        if number is not None:
            plain = number.replace(",", "")
            if sum(c.isdigit() for c in plain) > MAX_NUMBER_DIGITS:
                return None
            if tokens and _is_operand_end(tokens[-1]):
                return None  # "1 2" or ")3": two operands in a row
            tokens.append(plain)
        elif symbol == "%":
            if not tokens or not _is_operand_end(tokens[-1]):
                return None
            start = _operand_start(tokens)
            if start is None:
                return None
            # "x%" is the atom x in hundredths: parenthesised so that 200/50% is 200/(50/100).
            tokens[start:] = ["(", *tokens[start:], "/", "100", ")"]
        else:
            tokens.append(symbol)
    if not tokens:
        return None
    return " ".join(tokens)


def _is_operand_end(token: str) -> bool:
    return token == ")" or token[0].isdigit() or token[0] == "."


def _operand_start(tokens: list[str]) -> int | None:
    """Index where the operand that ends the token list begins (a number, or a parenthesised group)."""
    if tokens[-1] != ")":
        return len(tokens) - 1
    depth = 0
    for index in range(len(tokens) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(tokens[index], 0)
        if depth == 0:
            return index
    return None


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
}


def _value(node: ast.AST, source: str) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # Read the digits from the source, not the float: "0.1" is exactly 1/10.
        value = Fraction(ast.get_source_segment(source, node))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, source)
        value = -operand if isinstance(node.op, ast.USub) else operand
    elif isinstance(node, ast.BinOp) and type(node.op) in (*_BINARY, ast.Div):
        left, right = _value(node.left, source), _value(node.right, source)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise _Declined
            value = left / right
        else:
            value = _BINARY[type(node.op)](left, right)
    else:
        raise _Declined  # names, calls, **, //, comparisons, anything else
    if abs(value) > MAX_MAGNITUDE:
        raise _Declined
    return value


def annotated_data(keep_calculator_annotations: bool, source: str, synthetic: object | None) -> bool:
    """Whether MathDataModule's targets carry calculator annotations: ``keep_calculator_annotations``, or
    ``source: synthetic`` with the generator's ``calculator_annotations`` (a SyntheticSpec, or the mapping
    the CLI parser holds for it). The CLI links this to TutorModule's ``annotated_training_data``."""
    if keep_calculator_annotations:
        return True
    if source != "synthetic" or synthetic is None:
        return False
    if isinstance(synthetic, dict):
        return bool(synthetic.get("calculator_annotations", False))
    return bool(getattr(synthetic, "calculator_annotations", False))
