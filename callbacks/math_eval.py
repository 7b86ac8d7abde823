"""MathAnswerEval: every few validation epochs and when fit ends, the tutor solves held-out problems and the
share of right final answers is logged (val/answer_accuracy), with sample generations for TensorBoard.
Thin on purpose: generating is TutorModule.generate, grading is phi2tutor.grading."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from phi2tutor.errors import Phi2TutorError
from phi2tutor.grading import grade, read_jsonl, reference_answer
from phi2tutor.keys import (
    ACCURACY_KEY,
    CALCULATOR_CALLS_KEY,
    CALCULATOR_CHANGED_KEY,
    EVAL_SECONDS_KEY,
    INVALID_RATE_KEY,
    SAMPLES_KEY,
)
from phi2tutor.metrics import MathAnswerAccuracy

# Table cells longer than this are cut: TensorBoard's text view is for skimming, not for reading essays.
_MAX_CELL_CHARS = 400


class MathAnswerEval(Callback):
    """Answer accuracy on held-out problems, measured by generating solutions while training runs.

    Takes the first ``num_problems`` problems of the datamodule's ``eval_problems("val")`` (or of
    ``problems_file``), generates with ``pl_module.generate`` (greedy), grades the final answers and logs
    val/answer_accuracy, val/answer_invalid_rate, val/answer_eval_seconds and a table of sample
    generations (TensorBoard text, val/answer_samples). It runs at the validation of every
    ``every_n_epochs``-th epoch (epochs 2, 4, 6... for 2, whatever ``check_val_every_n_epoch`` is), at every
    ``trainer.validate``, and when fit ends (unless the last validation already graded the final
    weights). Under DDP each process generates for its shard of the problems and the counts are summed
    across processes.

    ModelCheckpoint and EarlyStopping can monitor val/answer_accuracy. With every_n_epochs > 1 the key is
    missing on the other epochs, so give ModelCheckpoint the same every_n_epochs and EarlyStopping
    strict=False (or keep every_n_epochs=1 and thin out validation with check_val_every_n_epoch).

    When the tutor decodes with the calculator (TutorModule's ``calculator``), it also logs
    val/calculator_calls (annotations the calculator completed, summed over the graded problems) and
    val/calculator_changed (of those, how many differ from what the model would have written itself).

    The results so far are in ``history``, saved in checkpoints: one dict per evaluation with epoch
    (1-based, as every message says it: the epoch just validated; at fit end the number of epochs trained,
    0 before training), step (global step), stage
    ("validation", "validate" or "fit_end"), accuracy, invalid_rate, correct, invalid, total and seconds,
    and calculator (on or off) with calculator_calls, calculator_changed and calculator_declined (None
    when it was off).
    The last sample rows are in ``last_samples``.

    Args:
        every_n_epochs: evaluate at the validation of every n-th epoch during fit (0: only when fit
            ends). Generation is slow, so evaluating less often than validation saves time.
        num_problems: how many held-out problems to solve each time (always the same ones, the first of
            the split, so results are comparable across epochs). ``phi2tutor test`` grades the whole
            test split.
        batch_size: problems generated per batch.
        max_new_tokens: the longest solution generated, in tokens; a solution cut short usually has no
            final answer and counts as invalid.
        decimal_comma: read "," as the decimal mark in outputs and references ("2,5" is 2.5), for
            Spanish data; otherwise a comma is a thousands separator.
        num_samples_logged: how many (question, output, extracted answer, reference, correct) rows to
            log as a TensorBoard text table (0: none).
        problems_file: a .jsonl file of {"question": ..., "answer": "... #### N"} rows to use instead of
            the datamodule's eval_problems("val").
        evaluate_before_training: also grade the untouched base (plus a fresh, zero-effect LoRA) when fit
            starts, logged at step 0, so the curve and the report show accuracy before and after.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_problems: int = 64,
        batch_size: int = 32,
        max_new_tokens: int = 128,
        decimal_comma: bool = False,
        num_samples_logged: int = 8,
        problems_file: str | None = None,
        evaluate_before_training: bool = False,
    ) -> None:
        for name, value, minimum in (
            ("every_n_epochs", every_n_epochs, 0),
            ("num_problems", num_problems, 1),
            ("batch_size", batch_size, 1),
            ("max_new_tokens", max_new_tokens, 1),
            ("num_samples_logged", num_samples_logged, 0),
        ):
            if value < minimum:
                raise Phi2TutorError(
                    f"MathAnswerEval option {name}={value} is invalid: it must be at least {minimum}."
                )
        self.every_n_epochs = every_n_epochs
        self.num_problems = num_problems
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.decimal_comma = decimal_comma
        self.num_samples_logged = num_samples_logged
        self.problems_file = problems_file
        self.evaluate_before_training = evaluate_before_training
        self.history: list[dict[str, Any]] = []
        self.last_samples: list[dict[str, Any]] = []
        # Kept in the checkpoint state for the record; the every_n_epochs rule counts epochs.
        self._validation_runs = 0
        self._problems: list[dict[str, str]] | None = None
        self._split = "val"

    @property
    def last_result(self) -> dict[str, Any] | None:
        """The latest evaluation's history entry, None before the first one."""
        return self.history[-1] if self.history else None

    # --- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in (TrainerFn.FITTING, TrainerFn.VALIDATING, TrainerFn.TESTING):
            return
        self._split = "test" if stage == TrainerFn.TESTING else "val"
        if not callable(getattr(pl_module, "generate", None)):
            raise Phi2TutorError(
                f"MathAnswerEval needs a model with generate(questions, max_new_tokens, batch_size), and "
                f"{type(pl_module).__name__} has none. Use phi2tutor.model.TutorModule, or remove the "
                f"MathAnswerEval callback from the configuration."
            )
        # Loaded now, not at the first evaluation, so bad problems fail before an epoch of training is spent.
        self._problems = self._load_problems(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run already has its "before" entry.
        if not self.evaluate_before_training or trainer.global_step > 0 or self.history:
            return
        result = self._evaluate(trainer, pl_module, "before_training")
        metrics = {ACCURACY_KEY: result["accuracy"], INVALID_RATE_KEY: result["invalid_rate"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._validation_runs += 1
            # Epochs, not validation runs: with check_val_every_n_epoch=2 and every_n_epochs=2 this grades
            # epochs 2, 4, 6 (counting validation runs would grade 4, 8, 12).
            if self.every_n_epochs == 0 or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
                return
            stage = "validation"
        else:
            stage = "validate"
        self._log_result(pl_module, self._evaluate(trainer, pl_module, stage), "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_result(pl_module, self._evaluate(trainer, pl_module, "test"), "test")

    def _log_result(self, pl_module: pl.LightningModule, result: dict[str, Any], prefix: str) -> None:
        # Logged through the module so ModelCheckpoint/EarlyStopping see it in callback_metrics. The values
        # are already global (synced metric), so sync_dist only silences Lightning's DDP warning for the
        # rates, and takes the slowest process for the time.
        for key, value, reduce_fx in (
            (ACCURACY_KEY, result["accuracy"], "mean"),
            (INVALID_RATE_KEY, result["invalid_rate"], "mean"),
            (EVAL_SECONDS_KEY, result["seconds"], "max"),
            *_calculator_metrics(result, "mean"),
        ):
            pl_module.log(
                key.replace("val/", f"{prefix}/", 1),
                float(value),
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                reduce_fx=reduce_fx,
                batch_size=1,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = self.last_result
        if last is not None and last["step"] == trainer.global_step:
            return  # the last validation already graded these very weights
        result = self._evaluate(trainer, pl_module, "fit_end")
        # self.log is not allowed in on_train_end: write to the loggers directly (they are rank-zero only).
        metrics = {
            ACCURACY_KEY: result["accuracy"],
            INVALID_RATE_KEY: result["invalid_rate"],
            EVAL_SECONDS_KEY: result["seconds"],
            **{key: value for key, value, _ in _calculator_metrics(result, "mean")},
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=_logger_step(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history], "validation_runs": self._validation_runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        self._validation_runs = int(state_dict.get("validation_runs", 0))

    # --- the work ---------------------------------------------------------------------------------------

    def _load_problems(self, trainer: pl.Trainer) -> list[dict[str, str]]:
        if self.problems_file is not None:
            rows = read_jsonl(self.problems_file, ["question", "answer"], "problems")
            where = [f"{self.problems_file}, line {line_number}" for line_number, _ in rows]
            problems = [row for _, row in rows]
            source = str(self.problems_file)
        else:
            datamodule = trainer.datamodule
            if datamodule is None or not callable(getattr(datamodule, "eval_problems", None)):
                raise Phi2TutorError(
                    "MathAnswerEval needs held-out problems: a datamodule with eval_problems(split) "
                    "(phi2tutor.data.MathDataModule has it), or the callback's problems_file option naming "
                    'a .jsonl file of {"question": ..., "answer": "... #### N"} rows.'
                )
            problems = list(datamodule.eval_problems(self._split))
            source = f"{type(datamodule).__name__}.eval_problems({self._split!r})"
            where = [f"{source}, problem {index}" for index in range(len(problems))]
        if self._split != "test":  # test grades the whole test split; validation a fixed subset
            problems = problems[: self.num_problems]
            where = where[: self.num_problems]
        for problem, place in zip(problems, where):
            if not (
                isinstance(problem, dict)
                and isinstance(problem.get("question"), str)
                and isinstance(problem.get("answer"), str)
            ):
                raise Phi2TutorError(
                    f"MathAnswerEval: {place} is not a problem: it must be a dict with text fields "
                    f"'question' and 'answer', got {str(problem)[:100]}. Fix the data source."
                )
            if reference_answer(problem["answer"], self.decimal_comma) is None:
                raise Phi2TutorError(
                    f"MathAnswerEval: the answer of {place} ({problem['answer'][-60:]!r}) states no final "
                    f"answer. It must end in '#### N' (GSM8K style) or be a bare number; fix the data source."
                )
        if not problems:
            raise Phi2TutorError(
                f"MathAnswerEval found no held-out problems in {source}. Give the validation split some "
                f"problems, or point problems_file at a .jsonl file of question/answer rows."
            )
        if self._split != "test" and len(problems) < self.num_problems:
            rank_zero_warn(
                f"MathAnswerEval: num_problems={self.num_problems} but {source} has only {len(problems)}; "
                f"evaluating on {len(problems)}."
            )
        return problems

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Any]:
        problems = self._problems if self._problems is not None else self._load_problems(trainer)
        # Strided shards keep every process's share within one problem of the others.
        shard = problems[trainer.global_rank :: trainer.world_size]
        started = time.perf_counter()
        outputs = self._generate(pl_module, [problem["question"] for problem in shard])
        if len(outputs) != len(shard):
            raise RuntimeError(f"generate() returned {len(outputs)} outputs for {len(shard)} questions")
        references = [problem["answer"] for problem in shard]
        # A fresh metric on the module's device: NCCL can only sum tensors that live on the GPU.
        metric = MathAnswerAccuracy(decimal_comma=self.decimal_comma).to(pl_module.device)
        metric.update(outputs, references)
        summary = metric.summary()
        calculator = self._calculator_counts(trainer, pl_module, bool(shard))
        seconds = time.perf_counter() - started
        result = {
            "epoch": _epoch_number(trainer, stage),
            "step": trainer.global_step,
            "stage": stage,
            "accuracy": summary["accuracy"],
            "invalid_rate": summary["invalid_rate"],
            "correct": summary["correct"],
            "invalid": summary["invalid"],
            "total": summary["total"],
            "seconds": seconds,
            **calculator,
        }
        self.history.append(result)
        self.last_samples = self._sample_rows(shard, outputs)
        if trainer.is_global_zero:
            self._log_samples(trainer)
            print(
                f"MathAnswerEval ({stage}, epoch {result['epoch']}, step {result['step']}): answer accuracy "
                f"{result['accuracy']:.3f} ({result['correct']}/{result['total']}), invalid "
                f"{result['invalid_rate']:.3f} ({result['invalid']}/{result['total']}), {seconds:.1f} s"
                + _calculator_summary(result),
                flush=True,
            )
        return result

    @staticmethod
    def _calculator_counts(
        trainer: pl.Trainer, pl_module: pl.LightningModule, generated: bool
    ) -> dict[str, Any]:
        """What the calculator did in this evaluation, summed over processes (None values when it was off)."""
        counts = getattr(pl_module, "last_calculator_counts", None) if generated else None
        enabled = bool(getattr(pl_module, "calculator_enabled", False))
        local = [counts.calls, counts.changed, counts.declined] if counts is not None else [0, 0, 0]
        total = trainer.strategy.reduce(
            torch.tensor(local, dtype=torch.float64, device=pl_module.device), reduce_op="sum"
        )
        calls, changed, declined = (int(value) for value in total.tolist())
        if not enabled:
            return {
                "calculator": False,
                "calculator_calls": None,
                "calculator_changed": None,
                "calculator_declined": None,
            }
        return {
            "calculator": True,
            "calculator_calls": calls,
            "calculator_changed": changed,
            "calculator_declined": declined,
        }

    def _generate(self, pl_module: pl.LightningModule, questions: list[str]) -> list[str]:
        if not questions:  # a process whose shard is empty (more processes than problems)
            return []
        was_training = pl_module.training
        pl_module.eval()
        try:
            # At on_train_end grad mode is on; in validation Lightning's inference mode already covers this.
            with torch.no_grad():
                outputs = pl_module.generate(
                    questions, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
                )
        finally:
            pl_module.train(was_training)
        return list(outputs)

    def _sample_rows(self, shard: list[dict[str, str]], outputs: list[str]) -> list[dict[str, Any]]:
        rows = []
        for problem, output in list(zip(shard, outputs))[: self.num_samples_logged]:
            graded = grade(output, problem["answer"], self.decimal_comma)
            rows.append(
                {
                    "question": problem["question"],
                    "output": output,
                    "extracted": graded.extracted,
                    "reference": graded.reference,
                    "correct": graded.correct,
                }
            )
        return rows

    def _log_samples(self, trainer: pl.Trainer) -> None:
        if not self.last_samples:
            return
        table = samples_markdown(self.last_samples)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(SAMPLES_KEY, table, global_step=_logger_step(trainer))


def _epoch_number(trainer: pl.Trainer, stage: str) -> int:
    """The 1-based epoch an evaluation belongs to, as every message numbers epochs: the epoch being
    validated, the number of epochs trained at fit end (current_epoch has moved past the last one), 0 before
    training."""
    if stage == "before_training":
        return 0
    if stage in ("fit_end", "validate", "test"):
        return trainer.current_epoch
    return trainer.current_epoch + 1


def _calculator_metrics(result: dict[str, Any], reduce_fx: str) -> list[tuple[str, float, str]]:
    """(key, value, reduce_fx) of the calculator's counts; none when the calculator was off."""
    if not result.get("calculator"):
        return []
    return [
        (CALCULATOR_CALLS_KEY, float(result["calculator_calls"]), reduce_fx),
        (CALCULATOR_CHANGED_KEY, float(result["calculator_changed"]), reduce_fx),
    ]


def _calculator_summary(result: dict[str, Any]) -> str:
    if not result.get("calculator"):
        return ""
    return (
        f", calculator: {result['calculator_calls']} calls, {result['calculator_changed']} changed the model's "
        f"tokens, {result['calculator_declined']} declined"
    )


def _logger_step(trainer: pl.Trainer) -> int:
    """The x-axis value Lightning gives logged metrics right now, so the table lines up with the scalars
    (Lightning's own LearningRateMonitor and DeviceStatsMonitor read the same counter)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of sample generations, one row per problem, as TensorBoard's text view shows it."""
    lines = [
        "| # | question | output | extracted | reference | correct |",
        "|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(rows, start=1):
        extracted = "(none)" if row["extracted"] is None else row["extracted"]
        cells = [str(index), row["question"], row["output"], extracted, row["reference"]]
        cells.append("yes" if row["correct"] else "no")
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _markdown_cell(text: str) -> str:
    if len(text) > _MAX_CELL_CHARS:
        text = text[: _MAX_CELL_CHARS - 1] + "…"
    # A "|" would end the cell and a newline the row; TensorBoard's sanitizer keeps <br>.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
