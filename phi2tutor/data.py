"""MathDataModule: math word problems from the hub, local files or the bundled generator, shown
through the prompt template, tokenized once (prompt masked, answer + EOS learned) and batched with
dynamic padding and length grouping.
"""

from __future__ import annotations

import json
import math
import random
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from phi2tutor.calculator import annotated_data
from phi2tutor.errors import Phi2TutorError, check_option, first_line
from phi2tutor.files import read_text, require_file, text_lines
from phi2tutor.grading import reference_answer
from phi2tutor.keys import TRUNCATED_KEY
from phi2tutor.memory.planner import AUTO_BATCH
from phi2tutor.phi2 import PHI2_HUB_ID
from phi2tutor.prompts import PHI2_QA_TEMPLATE, format_prompt
from phi2tutor.synthetic import SyntheticSpec, generate_splits

CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
SPLITS = ("train", "val", "test")


@dataclass
class TokenizedExample:
    """One example: token ids of prompt + answer + EOS, and how many leading tokens are prompt."""

    example_id: int
    input_ids: list[int]
    prompt_length: int
    # Answer tokens of the whole optimizer step this example is trained in (all its trained micro-batches,
    # on the step_processes processes whose data the sampler orders); set by TrainingSampler, None outside
    # training.
    step_target_tokens: int | None = None
    step_processes: int = 1

    @property
    def target_tokens(self) -> int:
        """Tokens the loss is taken on: the answer and EOS (the prompt is masked)."""
        return len(self.input_ids) - self.prompt_length


class StepIndex(NamedTuple):
    """An index that TrainingSampler yields: the example, the target tokens of its optimizer step, and how
    many processes' micro-batches that count covers."""

    example: int
    step_target_tokens: int
    step_processes: int = 1


class TokenizedDataset(Dataset):
    def __init__(self, examples: list[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | StepIndex) -> TokenizedExample:
        if isinstance(index, StepIndex):
            return replace(
                self.examples[index.example],
                step_target_tokens=index.step_target_tokens,
                step_processes=index.step_processes,
            )
        return self.examples[index]


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which neighbours have similar lengths, so batches carry little padding.

    Indices are shuffled with ``seed + epoch``, cut into mega-batches of ``batch_size * group_factor``
    and sorted by length inside each; Lightning calls ``set_epoch`` (and wraps the sampler for DDP),
    so the order is reproducible and a resumed run sees the same batches.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        group_factor: int = 16,
        longest_first: bool = False,
    ) -> None:
        self.lengths = lengths
        self.megabatch = max(1, batch_size * group_factor)
        self.seed = seed
        self.epoch = 0
        # Every index from the longest down: the worst case the data holds, for the first-step memory check.
        self.longest_first = longest_first

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = list(range(len(self.lengths)))
        if self.longest_first:
            yield from sorted(order, key=lambda i: -self.lengths[i])
            return
        random.Random(self.seed + self.epoch).shuffle(order)
        for start in range(0, len(order), self.megabatch):
            yield from sorted(order[start : start + self.megabatch], key=lambda i: -self.lengths[i])


class TrainingSampler(DistributedSampler):
    """This process's share of the epoch's length-grouped order, resumable mid-epoch, every index tagged
    with the target tokens of the optimizer step it belongs to.

    Process ``rank`` takes every ``num_replicas``-th index of the one order (as torch's DistributedSampler
    with shuffle=False: padded by repeating the start), so micro-batch k of all processes together is
    positions [k*B*R, (k+1)*B*R) of the order and an optimizer step of ``accumulation`` micro-batches is a
    known block of it: its total target tokens are known before the step starts, on every process,
    without communication (TutorModule divides the step's summed token losses by it).

    A DistributedSampler subclass, so Lightning uses it as it is under DDP instead of wrapping it in a
    sampler that shuffles again. ``resume_at`` = (epoch, micro-batches already trained in it) skips those
    batches the first time that epoch is iterated. ``limit_batches`` is the Trainer's
    limit_train_batches: the micro-batches past it are never trained, so the epoch's last step counts
    only the tokens of those that are (Lightning steps the optimizer on an epoch's last batch, mid
    accumulation or not).
    """

    def __init__(
        self,
        order: LengthGroupedSampler,
        target_tokens: list[int],
        batch_size: int,
        accumulation: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        resume_at: tuple[int, int] | None = None,
        limit_batches: int | float = 1.0,
    ) -> None:
        super().__init__(order, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.order = order
        self.target_tokens = target_tokens
        self.batch_size = batch_size
        self.accumulation = max(1, accumulation)
        self.resume_at = resume_at
        self.limit_batches = limit_batches
        # Constructed at the resumed epoch: a DataLoader with workers draws its first indices when its
        # iterator is made, before Lightning calls set_epoch.
        self.set_epoch(resume_at[0] if resume_at else 0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.order.set_epoch(epoch)

    def __iter__(self):
        # The check runs at the first index drawn, not when the iterator is made: an iterator made and
        # dropped unused (Lightning makes one during setup) does not use up the resume position.
        skip_batches = 0
        if self.resume_at is not None:
            if self.resume_at[0] == self.epoch:
                skip_batches = self.resume_at[1]
            self.resume_at = None
        order = list(self.order)
        order += (order * math.ceil(self.total_size / max(1, len(order))))[: self.total_size - len(order)]
        # Positions of the micro-batches this epoch trains: Lightning's own limit_train_batches rule.
        trained = self.trained_batches() * self.batch_size * self.num_replicas
        step_size = self.batch_size * self.accumulation * self.num_replicas  # positions per optimizer step
        step_tokens = [
            sum(self.target_tokens[i] for i in order[start : min(start + step_size, trained)])
            for start in range(0, len(order), step_size)
        ]
        for position in range(
            self.rank + skip_batches * self.batch_size * self.num_replicas, len(order), self.num_replicas
        ):
            yield StepIndex(order[position], step_tokens[position // step_size], self.num_replicas)

    def trained_batches(self) -> int:
        """Micro-batches of this process that an epoch trains: all of them, or limit_train_batches's share."""
        from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
        from lightning.pytorch.trainer.states import RunningStage

        batches = math.ceil(self.num_samples / self.batch_size)
        return int(_parse_num_batches(RunningStage.TRAINING, batches, self.limit_batches))


def collate_examples(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are -100 on the prompt and on padding.

    Padding is masked by position, not by token id: the pad token is EOS, and the EOS that ends an
    answer must stay a target or generations never stop.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, example.prompt_length : len(ids)] = ids[example.prompt_length :]
    example_ids = torch.tensor([e.example_id for e in examples], dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "example_ids": example_ids,
    }
    if examples[0].step_target_tokens is not None:
        batch["step_target_tokens"] = torch.tensor(examples[0].step_target_tokens, dtype=torch.long)
        batch["step_processes"] = torch.tensor(examples[0].step_processes, dtype=torch.long)
    return batch


class MathDataModule(LightningDataModule):
    def __init__(
        self,
        source: Literal["hub", "files", "synthetic"] = "hub",
        hub_dataset: str = "openai/gsm8k",
        hub_config: str | None = "main",
        hub_train_split: str = "train",
        hub_test_split: str = "test",
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        synthetic: SyntheticSpec | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        prompt_template: str = PHI2_QA_TEMPLATE,
        keep_calculator_annotations: bool = False,
        skip_invalid_rows: bool = False,
        max_length: int = 512,
        batch_size: int | str = 4,
        effective_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 42,
        audit: bool = True,
        tokenizer_name_or_path: str | None = None,
    ) -> None:
        """Math problems with GSM8K-style answers ("... #### N"), tokenized for causal-LM fine-tuning.

        Args:
            source: Where the problems come from: ``hub`` (a datasets hub id), ``files`` (local
                .jsonl/.json/.parquet) or ``synthetic`` (the bundled offline generator).
            hub_dataset: Hub dataset id, for ``source: hub``.
            hub_config: Hub dataset configuration (GSM8K: ``main``).
            hub_train_split: Hub split used for training (and, split off by ``val_fraction``, validation).
            hub_test_split: Hub split used by ``test`` and as held-out problems.
            train_path: Training file, for ``source: files``.
            val_path: Validation file; without it a seeded ``val_fraction`` of train is held out.
            test_path: Test file for ``phi2tutor test``; without it the validation problems are used.
            predict_path: Questions file (.jsonl with the question field) for ``phi2tutor predict``.
            synthetic: Generator settings, for ``source: synthetic`` (sizes, language, difficulty, seed).
            question_field: Name of the question field in each row.
            answer_field: Name of the answer field; its text must end with "#### N".
            prompt_template: Prompt with a ``{question}`` field (Phi-2: "Instruct: {question}\\nOutput:").
            keep_calculator_annotations: Keep GSM8K's ``<<48/2=24>>`` annotations in the targets (for
                ``source: synthetic`` the generator then writes them); a tutor trained on them decodes with
                the calculator (TutorModule's ``calculator``).
            skip_invalid_rows: Skip rows without the answer or a final "#### N" (and prompts longer than
                max_length), reporting how many, instead of stopping with an error.
            max_length: Longest tokenized example; longer answers are truncated and counted.
            batch_size: Training micro-batch size per device, or ``auto``: the largest micro-batch the memory
                planner puts under the budget by its margin (AUTO_BATCH_MARGIN, 10%; the budget is
                GPUMemoryProfiler's budget_mb, capped by the CUDA device's memory) that divides the effective batch, with trainer.accumulate_grad_batches set to
                keep the effective batch; on a CUDA device the first step is tried and backs off one size on
                out of memory. Printed at start, written resolved into config.yaml and into run.json.
            effective_batch_size: Examples per optimizer step over all devices; when set,
                trainer.accumulate_grad_batches = effective_batch_size / (batch_size x devices x nodes)
                replaces the configured one. Default: with ``batch_size: auto``, the config's accumulation at
                micro-batch 1 (trainer.accumulate_grad_batches x devices x nodes); else unused.
            eval_batch_size: Validation/test batch size; default ``batch_size``.
            val_fraction: Share of the training rows held out for validation when no validation source exists.
            group_by_length: Batch examples of similar length together (less padding, same loss).
            num_workers: DataLoader worker processes.
            seed: Seed of the validation split and of the training order.
            audit: At the start of fit, write the data report (data_report.md: duplicates, train/test
                overlap, token lengths, difficulty; ``phi2tutor data`` writes the same) into the run directory.
            tokenizer_name_or_path: Tokenizer to use; the CLI links it to the model's tokenizer.
        """
        super().__init__()
        for name, value, valid, requirement in (
            (
                "batch_size",
                batch_size,
                batch_size == AUTO_BATCH or (_is_integer(batch_size) and batch_size >= 1),
                f"a positive integer, or {AUTO_BATCH} (the largest micro-batch the memory planner fits in the "
                "budget)",
            ),
            (
                "effective_batch_size",
                effective_batch_size,
                effective_batch_size is None
                or (_is_integer(effective_batch_size) and effective_batch_size >= 1),
                "a positive integer (examples per optimizer step over all devices) or null",
            ),
            (
                "eval_batch_size",
                eval_batch_size,
                eval_batch_size is None or eval_batch_size >= 1,
                "a positive integer or null (batch_size)",
            ),
            ("max_length", max_length, max_length >= 2, "at least 2 tokens"),
            ("val_fraction", val_fraction, 0 <= val_fraction < 1, "in [0, 1)"),
            ("num_workers", num_workers, num_workers >= 0, "0 or more"),
        ):
            check_option("data", name, value, valid, requirement)
        self.save_hyperparameters(ignore=["tokenizer_name_or_path"])
        self.synthetic = synthetic or SyntheticSpec()
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.tokenizer = None
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.datasets: dict[str, TokenizedDataset] = {}
        self.truncated_examples = 0
        # Per split: (prompt, answer + EOS) token lengths measured when the split was tokenized.
        self.token_lengths: dict[str, tuple[list[int], list[int]]] = {}
        self.skipped: dict[str, dict[str, int]] = {}  # per split: rows skipped, by reason
        self._resume_at: tuple[int, int] | None = None  # (epoch, micro-batches done), from a checkpoint
        # Set by AutoMicroBatch's first-step check: the training order starts with the longest examples.
        self.longest_first = False

    # ------------------------------------------------------------------ rows
    def load_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Validated {question, answer} rows of every split (cached: read once per run); each row also holds
        ``where`` (the row in the user's terms) and ``annotations`` (calculator annotations as read)."""
        if self.rows:
            return self.rows
        hp = self.hparams
        if hp.source == "synthetic":
            splits = generate_splits(
                replace(self.synthetic, calculator_annotations=self.calculator_annotations)
            )
            rows = {
                split: [
                    self._clean(r, "question", "answer", f"synthetic {split} problem {number}")
                    for number, r in enumerate(splits[split], start=1)
                ]
                for split in SPLITS
            }
        else:
            raw = self._read_files() if hp.source == "files" else self._read_hub()
            rows = {
                split: self._validate_rows(records, origin, split) for split, (origin, records) in raw.items()
            }
            if "val" not in rows:
                rows["train"], rows["val"] = self._split_off_validation(rows["train"])
            rows.setdefault("test", rows["val"])
        for split in ("train", "val"):
            if not rows[split]:
                raise Phi2TutorError(
                    f"The {split} split is empty after reading the data (source {hp.source}). Check the "
                    f"{split} file or dataset split, the field names ({hp.question_field!r}, "
                    f"{hp.answer_field!r}) and data.val_fraction."
                )
        self.rows = rows
        return rows

    def _read_files(self) -> dict[str, tuple[str, list[tuple[int, dict]]]]:
        hp = self.hparams
        if hp.train_path is None:
            raise Phi2TutorError(
                "data.source is 'files' but data.train_path is not set: give a .jsonl, .json or .parquet file."
            )
        raw = {}
        for split, path in (("train", hp.train_path), ("val", hp.val_path), ("test", hp.test_path)):
            if path:
                raw[split] = (path, read_records(path, f"{split} data (data.{split}_path)"))
        return raw

    def prepare_data(self) -> None:
        """Download the hub dataset into the datasets cache. Lightning calls this once per node (local rank
        zero) before any process's setup, so under DDP the download happens once; setup then reads the cache."""
        if self.hparams.source == "hub":
            self._hub_tables()

    def _hub_tables(self) -> dict[str, Any]:
        hp = self.hparams
        try:
            import datasets

            return {
                split: datasets.load_dataset(hp.hub_dataset, hp.hub_config, split=hub_split)
                for split, hub_split in (("train", hp.hub_train_split), ("test", hp.hub_test_split))
            }
        except Exception as error:  # datasets raises many types for "not reachable"
            raise Phi2TutorError(
                f"Could not load the dataset {hp.hub_dataset!r} (config {hp.hub_config!r}) from the hub: "
                f"{first_line(error)}. "
                "Without network access, download it elsewhere and use data.source: files with "
                "data.train_path (and data.test_path), or data.source: synthetic for the bundled problems."
            ) from None

    def _read_hub(self) -> dict[str, tuple[str, list[tuple[int, dict]]]]:
        hp = self.hparams
        splits = {"train": hp.hub_train_split, "test": hp.hub_test_split}
        # After prepare_data this reads datasets' local cache (load_dataset reuses a downloaded dataset).
        return {
            split: (f"{hp.hub_dataset}[{splits[split]}]", list(enumerate(table, start=1)))
            for split, table in self._hub_tables().items()
        }

    def _validate_rows(
        self, records: list[tuple[int, dict]], origin: str, split: str = "train"
    ) -> list[dict[str, Any]]:
        hp = self.hparams
        unit = "line" if origin.lower().endswith(".jsonl") else "row"
        rows, skipped = [], 0
        for number, record in records:
            problem = row_problem(record, hp.question_field, hp.answer_field)
            if problem:
                if hp.skip_invalid_rows:
                    skipped += 1
                    reasons = self.skipped.setdefault(split, {})
                    reason = problem.split(" (fields")[0]
                    reasons[reason] = reasons.get(reason, 0) + 1
                    continue
                raise Phi2TutorError(
                    f"{origin}, {unit} {number} {problem}. Set data.question_field / data.answer_field to the "
                    "file's field names, fix the row, or set data.skip_invalid_rows: true to skip such rows."
                )
            rows.append(self._clean(record, hp.question_field, hp.answer_field, f"{origin}, {unit} {number}"))
        if skipped:
            rank_zero_info(f"phi2tutor | skipped {skipped} invalid rows of {origin} (data.skip_invalid_rows)")
        return rows

    def _clean(self, record: dict, question_key: str, answer_key: str, where: str) -> dict[str, Any]:
        answer = str(record[answer_key]).strip()
        annotations = len(CALCULATOR_ANNOTATION.findall(answer))  # as read, for the data audit
        if not self.calculator_annotations:
            answer = CALCULATOR_ANNOTATION.sub("", answer)
        # "where" names the row in the user's terms (file and line) for later messages.
        return {
            "question": str(record[question_key]).strip(),
            "answer": answer,
            "where": where,
            "annotations": annotations,
        }

    @property
    def calculator_annotations(self) -> bool:
        """Whether the targets carry ``<<expr=result>>`` annotations: keep_calculator_annotations, or the
        bundled generator's calculator_annotations (either one turns them on for ``source: synthetic``)."""
        return annotated_data(self.hparams.keep_calculator_annotations, self.hparams.source, self.synthetic)

    def _split_off_validation(self, rows: list[dict[str, Any]]) -> tuple[list, list]:
        order = list(range(len(rows)))
        random.Random(self.hparams.seed).shuffle(order)
        n_val = max(1, round(self.hparams.val_fraction * len(rows))) if len(rows) > 1 else 0
        val_ids = set(order[:n_val])
        return [r for i, r in enumerate(rows) if i not in val_ids], [rows[i] for i in sorted(val_ids)]

    def eval_problems(self, split: str = "val") -> list[dict[str, Any]]:
        """Held-out problems ({question, answer}) for answer evaluation."""
        return self.load_rows()[split]

    # ------------------------------------------------------------------ tokens
    def _load_tokenizer(self) -> None:
        if self.tokenizer is None:
            from phi2tutor.loading import load_tokenizer

            # Without the CLI's link to the model's tokenizer, Phi-2's (loading.tokenizer_source decides).
            self.tokenizer = load_tokenizer(self.tokenizer_name_or_path, PHI2_HUB_ID, None)

    def setup(self, stage: str) -> None:
        self._load_tokenizer()
        if stage == "predict":
            return
        rows = self.load_rows()
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, SPLITS)
        for split in needed:
            if split not in self.datasets:
                self.datasets[split] = self._tokenize(rows[split], split)
        if stage == "fit" and self.truncated_examples and self.trainer is not None and self.trainer.logger:
            self.trainer.logger.log_metrics({TRUNCATED_KEY: self.truncated_examples}, step=0)
        if stage == "fit" and self.hparams.audit and self.trainer is not None:
            # trainer.log_dir broadcasts under DDP: every process asks, rank zero writes.
            run_dir = self.trainer.log_dir if self.trainer.loggers else None
            if run_dir is None:
                rank_zero_info(
                    "phi2tutor | no run directory (no logger): the data report is not written; "
                    "`phi2tutor data --config ...` writes it"
                )
            elif self.trainer.is_global_zero:
                report = self.write_data_report(run_dir)
                rank_zero_info(f"phi2tutor | data report: {report}")

    def audit_splits(self) -> dict:
        """Every split as fit sees it, with token lengths, for phi2tutor.data_audit."""
        from phi2tutor.data_audit import SplitRows

        hp = self.hparams
        rows = self.load_rows()
        origins = {"synthetic": "bundled generator"}
        splits = {}
        for split in SPLITS:
            if split == "test" and rows["test"] is rows["val"]:
                continue  # no separate test source: the validation rows stand in, audited once
            # The lengths fit's own tokenization measured (train, val); the others are tokenized here.
            prompt_tokens, answer_tokens = self.token_lengths.get(split) or self._lengths(rows[split])
            splits[split] = SplitRows(
                questions=[r["question"] for r in rows[split]],
                answers=[r["answer"] for r in rows[split]],
                prompt_tokens=prompt_tokens,
                answer_tokens=answer_tokens,
                origin=self._origin(split) if hp.source != "synthetic" else origins["synthetic"],
                skipped=self.skipped.get(split, {}),
                annotations=[r["annotations"] for r in rows[split]],
            )
        return splits

    def _origin(self, split: str) -> str:
        hp = self.hparams
        if hp.source == "files":
            path = {"train": hp.train_path, "val": hp.val_path, "test": hp.test_path}[split]
            return str(path) if path else f"{hp.train_path} (val_fraction {hp.val_fraction})"
        hub_split = hp.hub_test_split if split == "test" else hp.hub_train_split
        held_out = f" (val_fraction {hp.val_fraction})" if split in ("train", "val") else ""
        return f"{hp.hub_dataset}[{hub_split}]{held_out}"

    def write_data_report(self, output_dir: str | Path, language: str = "en") -> Path:
        """Write data_report.md/.json and the length histogram into output_dir; returns the .md path."""
        from phi2tutor.data_audit import DATA_REPORT_MD, write_data_report

        self._load_tokenizer()
        write_data_report(
            self.audit_splits(),
            self.hparams.max_length,
            output_dir,
            language=language,
            annotations_kept=self.calculator_annotations,
        )
        return Path(output_dir) / DATA_REPORT_MD

    def _encode(self, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of each row's formatted prompt and of its answer (without EOS)."""
        if not rows:
            return [], []
        prompts = [format_prompt(self.hparams.prompt_template, r["question"]) for r in rows]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer([" " + r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
        return prompt_ids, answer_ids

    @staticmethod
    def _measure(prompt_ids: list[list[int]], answer_ids: list[list[int]]) -> tuple[list[int], list[int]]:
        # Answer lengths count the EOS token, learned like the answer.
        return [len(ids) for ids in prompt_ids], [len(ids) + 1 for ids in answer_ids]

    def _lengths(self, rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        return self._measure(*self._encode(rows))

    def _tokenize(self, rows: list[dict[str, Any]], split: str) -> TokenizedDataset:
        hp = self.hparams
        eos = self.tokenizer.eos_token_id
        prompt_ids, answer_ids = self._encode(rows)
        self.token_lengths[split] = self._measure(prompt_ids, answer_ids)
        examples, truncated, too_long = [], 0, []
        for index, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
            if len(prompt) >= hp.max_length:
                too_long.append(rows[index].get("where", f"{split} row {index + 1}"))
                continue
            ids = prompt + answer + [eos]
            if len(ids) > hp.max_length:
                truncated += 1
                ids = ids[: hp.max_length]
            examples.append(TokenizedExample(example_id=index, input_ids=ids, prompt_length=len(prompt)))
        if too_long and not hp.skip_invalid_rows:
            listed = "; ".join(too_long[:5]) + ("; ..." if len(too_long) > 5 else "")
            raise Phi2TutorError(
                f"{len(too_long)} prompts of the {split} split ({listed}) are {hp.max_length} tokens or longer, "
                "so nothing of their answers would be learned. Raise data.max_length, or set "
                "data.skip_invalid_rows: true to skip them."
            )
        if truncated:
            rank_zero_info(
                f"phi2tutor | {truncated} of {len(rows)} {split} examples truncated to max_length {hp.max_length}"
            )
        if split == "train":
            self.truncated_examples = truncated
        return TokenizedDataset(examples)

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        lengths = [len(e.input_ids) for e in dataset.examples]
        if shuffle:
            sampler = self._training_sampler(dataset, lengths, batch_size)
        else:
            sampler = sorted(range(len(dataset)), key=lambda i: -lengths[i])
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _training_sampler(self, dataset: TokenizedDataset, lengths: list[int], batch_size: int) -> Sampler:
        """The shuffled, length-grouped, resumable order; under DDP every process takes every n-th index of
        the one order.

        Lightning would wrap a plain sampler itself, but with shuffle=True for training, which shuffles the
        order once more and undoes the length grouping; TrainingSampler shards without that shuffle, so
        neighbours (and so each process's batches) keep similar lengths.
        """
        # group_factor 0 is a plain seeded shuffle: the same sampler, resumable, without grouping.
        group_factor = 16 if self.hparams.group_by_length else 0
        order = LengthGroupedSampler(lengths, batch_size, self.hparams.seed, group_factor, self.longest_first)
        trainer = self.trainer
        replicas = {"num_replicas": 1, "rank": 0}
        if trainer is not None and getattr(trainer._accelerator_connector, "use_distributed_sampler", True):
            kwargs = trainer.distributed_sampler_kwargs or {}
            replicas = {"num_replicas": kwargs.get("num_replicas", 1), "rank": kwargs.get("rank", 0)}
        # else: the user shards the data themselves (Trainer(use_distributed_sampler=False)).
        return TrainingSampler(
            order,
            [example.target_tokens for example in dataset.examples],
            batch_size,
            accumulation=trainer.accumulate_grad_batches if trainer is not None else 1,
            resume_at=self._resume_at,
            limit_batches=trainer.limit_train_batches if trainer is not None else 1.0,
            **replicas,
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where the training data order stands, saved in every checkpoint: (epoch, micro-batches done).

        Lightning's own stateful-loader restore is skipped when configure_optimizers reads
        trainer.estimated_stepping_batches, as TutorModule's schedule does (Lightning 2.6,
        Lightning-AI/pytorch-lightning#20550); the datamodule's state is restored before the loaders are
        made, so the position travels here.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epoch = trainer.fit_loop.epoch_progress.current.processed  # what Lightning passes to set_epoch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:  # an epoch-end checkpoint: the next epoch starts fresh
            epoch, batches = epoch + 1, 0
        return {"train_position": {"epoch": epoch, "batches": batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_position")
        if not position:
            return
        self._resume_at = (int(position["epoch"]), int(position["batches"]))
        if self._resume_at[1]:
            rank_zero_info(
                f"phi2tutor | resuming the training data order at epoch {self._resume_at[0] + 1}, after "
                f"micro-batch {self._resume_at[1]}"
            )
            # The data order is resumable, through this state rather than the loader's (see state_dict).
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")

    def _collate(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        return collate_examples(examples, self.tokenizer.pad_token_id)

    @property
    def micro_batch_size(self) -> int:
        """The training micro-batch: batch_size, once ``auto`` is resolved."""
        if self.hparams.batch_size == AUTO_BATCH:
            raise Phi2TutorError(
                "data.batch_size is auto, but nothing resolved it: the callback callbacks.micro_batch."
                "AutoMicroBatch does (phi2tutor's commands add it); a Trainer built in Python needs it in its "
                "callbacks, or give data.batch_size a number."
            )
        return self.hparams.batch_size

    @property
    def evaluation_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.micro_batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.micro_batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.evaluation_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.evaluation_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_path is None:
            raise Phi2TutorError(
                "phi2tutor predict needs data.predict_path: a .jsonl file with a question per line."
            )
        records = read_records(self.hparams.predict_path, "questions (data.predict_path)")
        questions = []
        for number, record in records:
            if not isinstance(record, dict) or self.hparams.question_field not in record:
                raise Phi2TutorError(
                    f"{self.hparams.predict_path}, line {number} has no {self.hparams.question_field!r} field. "
                    "Each line must be a JSON object with the question (set data.question_field to its name)."
                )
            questions.append(str(record[self.hparams.question_field]))
        return DataLoader(
            questions,
            batch_size=self.evaluation_batch_size,
            collate_fn=lambda batch: {"question": list(batch)},
        )


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def row_problem(record: Any, question_field: str, answer_field: str) -> str | None:
    """What is wrong with a training row, as the end of a sentence ("has ..."), or None when it is valid:
    a JSON object whose question and answer are text, the answer ending in "#### N" with N a number."""
    if not isinstance(record, dict) or question_field not in record or answer_field not in record:
        fields = (
            sorted(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        )
        return f"has no {question_field!r} or {answer_field!r} field (fields: {fields})"
    for field in (question_field, answer_field):
        value = record[field]
        if not isinstance(value, str):
            return f"has a {field!r} that is not text but {json.dumps(value, default=str)[:60]}"
        if not value.strip():
            return f"has an empty {field!r}"
    answer = record[answer_field]
    if "####" not in answer:
        return 'has an answer without a final "#### N"'
    if reference_answer(answer) is None:
        final = answer.rsplit("####", 1)[1].strip()
        return f'has an answer whose final "#### {final[:30]}" is not a number'
    return None


def read_records(path: str | Path, what: str = "data") -> list[tuple[int, Any]]:
    """(line or row number, record) pairs from a .jsonl, .json or .parquet file, with clear errors.

    The number is the one the user finds the row under: the file's line for .jsonl (blank lines count),
    the 1-based position in the list for .json and .parquet. ``what`` names the file in messages
    (e.g. "data (data.train_path)").
    """
    path = Path(path)
    suffix = path.suffix.lower()
    expected = {
        ".jsonl": "JSON Lines, one object per line",
        ".json": 'a JSON list of objects (or {"data": [...]})',
        ".parquet": "a Parquet table",
    }.get(suffix)
    if expected is None:
        raise Phi2TutorError(f"{path}: unsupported file type {suffix!r}. Use .jsonl, .json or .parquet.")
    if suffix == ".parquet":
        return _read_parquet(path, what)
    text = read_text(path, what, expected)
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text_lines(text), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise Phi2TutorError(
                    f"{path}, line {number} is not valid JSON ({error.msg} at column {error.colno}). Each "
                    "line of a .jsonl file must be one JSON object; fix or remove that line."
                ) from None
        return records
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise Phi2TutorError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        content = content["data"]
    if not isinstance(content, list):
        raise Phi2TutorError(f'{path} must hold a JSON list of objects (or {{"data": [...]}}).')
    return list(enumerate(content, start=1))


def _read_parquet(path: Path, what: str) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    require_file(path, what, "a Parquet table")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise Phi2TutorError(
            f"{path} is not a readable Parquet file ({first_line(error)}). If it is CSV or JSON text, convert "
            "it to .jsonl (one JSON object per line) or give it the matching extension."
        ) from None
    return list(enumerate(table.to_pylist(), start=1))
