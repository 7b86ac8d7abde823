"""Calculator-assisted decoding, as in the GSM8K paper: when a sequence has just written ``<<`` + an
expression + ``=``, phi2tutor.calculator evaluates the expression and the result and ``>>`` are forced as
that sequence's next tokens; decoding then goes on. A transformers LogitsProcessor with a queue of forced
tokens per row, so batched, left-padded, KV-cached ``generate`` keeps working unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import LogitsProcessor

from phi2tutor.calculator import MAX_EXPRESSION_CHARS, calculate

OPEN, CLOSE, EQUALS = "<<", ">>", "="


@dataclass
class CalculatorCounts:
    """What the calculator did over some generations (one count per annotation)."""

    calls: int = 0
    """Annotations the calculator completed (result and ``>>`` forced)."""
    changed: int = 0
    """Of those, annotations where a forced token differed from the model's own greedy choice at that step:
    the calculator changed what the model would have written."""
    declined: int = 0
    """``<<expr=`` written but declined (not an expression it accepts, division by zero, over the limits):
    the model's own tokens went on."""

    def add(self, other: CalculatorCounts) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def open_expression(text: str) -> str | None:
    """The expression of an annotation that ``text`` has just opened and ended with ``=`` (``<<48*17=``
    gives ``48*17``), or None when ``text`` does not end inside an open annotation at its ``=``."""
    if not text.endswith(EQUALS):
        return None
    start = text.rfind(OPEN)
    if start < 0 or CLOSE in text[start:]:
        return None
    expression = text[start + len(OPEN) : -len(EQUALS)]
    # A longer tail is declined by the calculator anyway; cap it so one stray "<<" is never re-read at length.
    return expression[: MAX_EXPRESSION_CHARS + 1]


def forced_token_ids(tokenizer, written: str, result: str) -> list[int]:
    """Tokens that write ``result + ">>"`` after the annotation opened in ``written`` (text ending in ``=``).

    Encoded with the annotation it completes (``<<48*17=816>>``), so the result gets the tokens the model
    saw in training; when no token boundary falls right after the ``=`` (a BPE merge across it), the
    forced text alone is encoded. Either way the decoded text is ``written + result + ">>"``.
    """
    annotation = written[written.rfind(OPEN) :]
    forced_text = result + CLOSE
    whole = tokenizer.encode(annotation + forced_text, add_special_tokens=False)
    for boundary in range(1, len(whole)):
        prefix = tokenizer.decode(whole[:boundary], clean_up_tokenization_spaces=False)
        if prefix == annotation:
            tail = whole[boundary:]
            if tokenizer.decode(tail, clean_up_tokenization_spaces=False) == forced_text:
                return tail
            break
        if len(prefix) > len(annotation):
            break
    return tokenizer.encode(forced_text, add_special_tokens=False)


def equals_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens whose text ends with ``=``: only after one of them can an annotation need the
    calculator, so other steps cost one set lookup per row."""
    vocabulary_size = len(tokenizer)
    texts = tokenizer.batch_decode(
        [[index] for index in range(vocabulary_size)], clean_up_tokenization_spaces=False
    )
    return frozenset(index for index, text in enumerate(texts) if text.endswith(EQUALS))


class CalculatorLogitsProcessor(LogitsProcessor):
    """Forces the calculator's result and ``>>`` after each ``<<expr=`` a row writes, per row.

    Args:
        tokenizer: the tokenizer of the model that generates.
        prompt_length: length of the (left-padded) prompt batch: text before it is never read, so an
            annotation in a prompt does not trigger the calculator.
        equals_ids: ``equals_token_ids(tokenizer)``, computed once per tokenizer by the caller.
    """

    def __init__(self, tokenizer, prompt_length: int, equals_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.equals_ids = equals_ids
        self.counts = CalculatorCounts()
        self._queues: list[list[int]] = []
        self._changed: list[bool] = []  # per row: the current forced annotation already counted as changed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self._queues:
            self._queues = [[] for _ in range(input_ids.shape[0])]
            self._changed = [False] * input_ids.shape[0]
        if input_ids.shape[1] > self.prompt_length:
            for row, last in enumerate(input_ids[:, -1].tolist()):
                if not self._queues[row] and last in self.equals_ids:
                    self._call_calculator(row, input_ids[row, self.prompt_length :])
        rows = [row for row, queue in enumerate(self._queues) if queue]
        if not rows:
            return scores
        forced = [self._queues[row].pop(0) for row in rows]
        row_index = torch.tensor(rows, device=scores.device)
        forced_index = torch.tensor(forced, device=scores.device)
        own_choice = scores[row_index].argmax(dim=-1).tolist()
        for row, mine, theirs in zip(rows, forced, own_choice):
            if mine != theirs and not self._changed[row]:
                self._changed[row] = True
                self.counts.changed += 1
        scores = scores.clone()
        scores[row_index] = float("-inf")
        scores[row_index, forced_index] = 0.0
        return scores

    def _call_calculator(self, row: int, new_tokens: torch.Tensor) -> None:
        written = self.tokenizer.decode(
            new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        expression = open_expression(written)
        if expression is None:
            return
        result = calculate(expression)
        if result is None:
            self.counts.declined += 1
            return
        self._queues[row] = forced_token_ids(self.tokenizer, written, result)
        self._changed[row] = False
        self.counts.calls += 1
