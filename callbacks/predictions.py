"""PredictionWriter: `phi2tutor predict` writes one JSON line per question (question, generation,
extracted answer) with the same answer extraction as grading and `score`; under DDP every process's rows
are gathered and written once, in the input order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from phi2tutor.grading import extract_answer


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output_path: str | None = None, decimal_comma: bool = False) -> None:
        """Write predictions as JSON lines when ``predict`` ends.

        Args:
            output_path: The .jsonl file to write; default ``predictions.jsonl`` in the run directory.
            decimal_comma: Read "2,5" as 2.5 when extracting answers (Spanish tutors).
        """
        super().__init__(write_interval="epoch")
        self.output_path = output_path
        self.decimal_comma = decimal_comma
        self.written_path: Path | None = None

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: list[Any],
        batch_indices: list[Any],
    ) -> None:
        # log_dir is a collective call under DDP: every process asks, rank zero writes.
        path = (
            Path(self.output_path) if self.output_path else Path(trainer.log_dir or ".") / "predictions.jsonl"
        )
        rows = self._gather_rows(trainer, predictions, batch_indices)
        if not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                extracted = extract_answer(row["generation"], self.decimal_comma)
                handle.write(json.dumps({**row, "extracted_answer": extracted}, ensure_ascii=False) + "\n")
        self.written_path = path
        rank_zero_info(f"phi2tutor | wrote {len(rows)} predictions to {path}")

    @staticmethod
    def _gather_rows(trainer: pl.Trainer, predictions: list[Any], batch_indices: list[Any]) -> list[dict]:
        """Every process's rows, each question once, in the order of the questions file.

        Under DDP each process predicted its shard (Lightning's DistributedSampler, which repeats a few
        questions to even the shards out); the batch indices say which question each row answers.
        """
        # One predict dataloader: Lightning passes [dataloader][batch][sample] indices.
        nested = bool(batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], list))
        indices = batch_indices[0] if nested else batch_indices
        indexed = [
            (index, row)
            for batch, batch_index in zip(predictions, indices)
            for index, row in zip(batch_index, batch)
        ]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, indexed)
            indexed = [pair for shard in gathered for pair in shard]
        return [row for _, row in sorted(dict(indexed).items())]
