"""MathAnswerAccuracy: the torchmetrics metric that sums phi2tutor.grading's grades across processes.

Kept apart from grading.py so that the text-only commands (``phi2tutor score``) never import torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from phi2tutor.grading import grade


class MathAnswerAccuracy(Metric):
    """Share of generated solutions whose final answer equals the reference, synced across processes.

    States are sums (correct, invalid, total), so under DDP the result is the global accuracy whatever the
    shard sizes. ``compute()`` returns the accuracy; :meth:`summary` adds the invalid rate and the counts.

    Args:
        decimal_comma: read "," as the decimal mark in outputs and references.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    invalid: torch.Tensor
    total: torch.Tensor

    def __init__(self, decimal_comma: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decimal_comma = decimal_comma
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("invalid", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generations: list[str], references: list[str]) -> None:
        """Grade generations against reference solutions ("... #### 72" or bare numbers), pairwise."""
        if len(generations) != len(references):
            raise ValueError(f"{len(generations)} generations but {len(references)} references")
        graded = [grade(text, ref, self.decimal_comma) for text, ref in zip(generations, references)]
        self.correct += sum(answer.correct for answer in graded)
        self.invalid += sum(answer.invalid for answer in graded)
        self.total += len(graded)

    def compute(self) -> torch.Tensor:
        """Accuracy, correct/total (0 when nothing was graded)."""
        if self.total == 0:
            return torch.zeros((), device=self.total.device)
        return self.correct.float() / self.total

    def summary(self) -> dict[str, float | int]:
        """accuracy, invalid_rate, correct, invalid, total over all processes (a collective call under DDP:
        every process must call it)."""
        # torchmetrics' public sync context: sums the states across processes, then restores the local ones.
        with self.sync_context():
            correct, invalid, total = int(self.correct), int(self.invalid), int(self.total)
        return {
            "accuracy": correct / total if total else 0.0,
            "invalid_rate": invalid / total if total else 0.0,
            "correct": correct,
            "invalid": invalid,
            "total": total,
        }
