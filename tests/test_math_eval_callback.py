"""Tests of callbacks.math_eval.MathAnswerEval on the real Lightning Trainer, with a scripted generate()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from callbacks.math_eval import MathAnswerEval, samples_markdown
from phi2tutor.errors import Phi2TutorError

# Ten problems; the callback takes the first eight. Of those, outputs are right for i % 4 in {0, 2}, wrong
# for i % 4 == 1 and have no answer for i % 4 == 3: accuracy 4/8, invalid 2/8. Problems 8 and 9 would be
# wrong, so using them would show.
PROBLEMS = [
    {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)
]


def scripted_output(index: int) -> str:
    if index >= 8 or index % 4 == 1:
        return f"{index} + 1 = 1000\n#### 1000"
    if index % 4 == 3:
        return "I am not sure | I cannot\nsay."
    return f"{index} plus one is {index + 1}.\nThe answer is {index + 1}."


class ScriptedTutor(pl.LightningModule):
    """A tiny trainable module whose generate() answers from a script, recording how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.generate_calls: list[dict[str, Any]] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def generate(self, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        self.generate_calls.append(
            {
                "questions": list(questions),
                "max_new_tokens": max_new_tokens,
                "batch_size": batch_size,
                "training": self.training,
                "grad_enabled": torch.is_grad_enabled(),
            }
        )
        return [scripted_output(int(question.split()[2])) for question in questions]


class TinyDataModule(pl.LightningDataModule):
    def __init__(self, problems: list[dict[str, str]] | None = None) -> None:
        super().__init__()
        self.problems = PROBLEMS if problems is None else problems
        generator = torch.Generator().manual_seed(0)
        self.dataset = TensorDataset(
            torch.randn(8, 2, generator=generator), torch.randn(8, 1, generator=generator)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=4)

    def eval_problems(self, split: str) -> list[dict[str, str]]:
        assert split == "val"
        return self.problems


class DataModuleWithoutProblems(TinyDataModule):
    eval_problems = None  # type: ignore[assignment]


def make_trainer(tmp_path: Path, callback: MathAnswerEval, max_epochs: int = 2, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        logger=TensorBoardLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, *kwargs.pop("callbacks", [])],
        **kwargs,
    )


def read_events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={TENSORS: 0})
    events.Reload()
    return events


def scalar_series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_logs_accuracy_text_table_and_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = MathAnswerEval(num_problems=8, batch_size=3, max_new_tokens=16, num_samples_logged=4)
    module = ScriptedTutor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/answer_accuracy", mode="max")
    trainer = make_trainer(tmp_path, callback, callbacks=[checkpoint])
    trainer.fit(module, datamodule=TinyDataModule())

    # Once per validation epoch (not in the sanity check), not again at fit end: the weights had not changed.
    assert len(module.generate_calls) == 2
    first_call = module.generate_calls[0]
    assert first_call["questions"] == [problem["question"] for problem in PROBLEMS[:8]]
    assert (first_call["max_new_tokens"], first_call["batch_size"]) == (16, 3)
    assert first_call["training"] is False and first_call["grad_enabled"] is False

    assert trainer.callback_metrics["val/answer_accuracy"].item() == pytest.approx(0.5)
    assert trainer.callback_metrics["val/answer_invalid_rate"].item() == pytest.approx(0.25)
    assert trainer.callback_metrics["val/answer_eval_seconds"].item() >= 0.0
    # ModelCheckpoint could monitor it: the best score is the logged accuracy.
    assert checkpoint.best_model_score.item() == pytest.approx(0.5)

    assert [(entry["epoch"], entry["step"], entry["stage"]) for entry in callback.history] == [
        (1, 2, "validation"),
        (2, 4, "validation"),
    ]
    for entry in callback.history:
        assert (entry["accuracy"], entry["invalid_rate"]) == (0.5, 0.25)
        assert (entry["correct"], entry["invalid"], entry["total"]) == (4, 2, 8)
        assert entry["seconds"] >= 0.0
    assert callback.last_result is callback.history[-1]

    events = read_events(trainer.logger.log_dir)
    assert scalar_series(events, "val/answer_accuracy") == [(1, 0.5), (3, 0.5)]
    assert scalar_series(events, "val/answer_invalid_rate") == [(1, 0.25), (3, 0.25)]
    assert len(events.Scalars("val/answer_eval_seconds")) == 2

    texts = events.Tensors("val/answer_samples/text_summary")
    assert [event.step for event in texts] == [1, 3]  # the same x-axis as the scalars
    table = texts[-1].tensor_proto.string_val[0].decode()
    lines = table.splitlines()
    assert lines[0] == "| # | question | output | extracted | reference | correct |"
    assert len(lines) == 2 + 4  # header, rule and num_samples_logged rows
    assert lines[2] == "| 1 | What is 0 + 1? | 0 plus one is 1.<br>The answer is 1. | 1 | 1 | yes |"
    assert lines[3] == "| 2 | What is 1 + 1? | 1 + 1 = 1000<br>#### 1000 | 1000 | 2 | no |"
    assert lines[5] == "| 4 | What is 3 + 1? | I am not sure \\| I cannot<br>say. | (none) | 4 | no |"
    assert callback.last_samples[1] == {
        "question": "What is 1 + 1?",
        "output": "1 + 1 = 1000\n#### 1000",
        "extracted": "1000",
        "reference": "2",
        "correct": False,
    }

    summary_lines = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("MathAnswerEval")
    ]
    assert summary_lines == [
        line.format(seconds=entry["seconds"])
        for line, entry in zip(
            [
                "MathAnswerEval (validation, epoch 1, step 2): answer accuracy 0.500 (4/8), "
                "invalid 0.250 (2/8), {seconds:.1f} s",
                "MathAnswerEval (validation, epoch 2, step 4): answer accuracy 0.500 (4/8), "
                "invalid 0.250 (2/8), {seconds:.1f} s",
            ],
            callback.history,
        )
    ]


def test_every_n_epochs_and_evaluation_when_fit_ends(tmp_path: Path) -> None:
    callback = MathAnswerEval(every_n_epochs=2, num_problems=8, num_samples_logged=0)
    module = ScriptedTutor()
    trainer = make_trainer(tmp_path, callback, max_epochs=3)
    trainer.fit(module, datamodule=TinyDataModule())

    # Epochs 1, 2, 3: epoch 2 evaluates; fit end evaluates the weights trained one epoch more.
    assert [(entry["epoch"], entry["step"], entry["stage"]) for entry in callback.history] == [
        (2, 4, "validation"),
        (3, 6, "fit_end"),
    ]
    assert module.generate_calls[-1]["grad_enabled"] is False
    assert module.training is True  # train mode restored after generating at on_train_end
    events = read_events(trainer.logger.log_dir)
    assert scalar_series(events, "val/answer_accuracy") == [(3, 0.5), (6, 0.5)]
    assert scalar_series(events, "val/answer_invalid_rate") == [(3, 0.25), (6, 0.25)]
    assert "val/answer_samples/text_summary" not in events.Tags()["tensors"]  # num_samples_logged=0


def test_every_n_epochs_counts_epochs_not_validation_runs(tmp_path: Path) -> None:
    # Validation every 2nd epoch and every_n_epochs=2: epochs 2 and 4 are graded (counting validation runs
    # would grade only the 2nd one, epoch 4).
    callback = MathAnswerEval(every_n_epochs=2, num_problems=4, num_samples_logged=0)
    trainer = make_trainer(tmp_path, callback, max_epochs=4, check_val_every_n_epoch=2)
    trainer.fit(ScriptedTutor(), datamodule=TinyDataModule())
    assert [(entry["epoch"], entry["stage"]) for entry in callback.history] == [
        (2, "validation"),
        (4, "validation"),
    ]


def test_only_at_fit_end_with_every_n_epochs_zero(tmp_path: Path) -> None:
    callback = MathAnswerEval(every_n_epochs=0, num_problems=4)
    trainer = make_trainer(tmp_path, callback, max_epochs=1)
    trainer.fit(ScriptedTutor(), datamodule=TinyDataModule())
    assert [(entry["stage"], entry["accuracy"], entry["total"]) for entry in callback.history] == [
        ("fit_end", 0.5, 4)
    ]
    assert "val/answer_accuracy" not in trainer.callback_metrics
    events = read_events(trainer.logger.log_dir)
    assert scalar_series(events, "val/answer_accuracy") == [(2, 0.5)]
    assert len(events.Tensors("val/answer_samples/text_summary")) == 1


def test_state_dict_round_trip_and_resume(tmp_path: Path) -> None:
    callback = MathAnswerEval(num_problems=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, callback, callbacks=[checkpoint])
    trainer.fit(ScriptedTutor(), datamodule=TinyDataModule())

    state = callback.state_dict()
    assert state == {"history": callback.history, "validation_runs": 2}
    json.dumps(state)  # plain data: safe in any checkpoint format
    restored = MathAnswerEval()
    restored.load_state_dict(state)
    assert restored.history == callback.history and restored.state_dict() == state
    state["history"][0]["accuracy"] = -1.0
    assert restored.history[0]["accuracy"] == 0.5  # a copy, not shared with the source

    saved = torch.load(checkpoint.last_model_path, weights_only=False)
    assert saved["callbacks"]["MathAnswerEval"]["history"] == callback.history

    # Resuming keeps the history and the count of validation runs and appends to them.
    resumed = MathAnswerEval(every_n_epochs=3, num_problems=8)
    trainer = make_trainer(tmp_path, resumed, max_epochs=3)
    trainer.fit(ScriptedTutor(), datamodule=TinyDataModule(), ckpt_path=checkpoint.last_model_path)
    assert [(entry["epoch"], entry["stage"]) for entry in resumed.history] == [
        (1, "validation"),
        (2, "validation"),
        (3, "validation"),  # epoch 3, so every_n_epochs=3 fires
    ]


def test_validate_evaluates_and_logs(tmp_path: Path) -> None:
    callback = MathAnswerEval(every_n_epochs=5, num_problems=6)
    trainer = make_trainer(tmp_path, callback)
    trainer.validate(ScriptedTutor(), datamodule=TinyDataModule())
    # Problems 0-5: right 0, 2, 4; wrong 1, 5; invalid 3.
    assert trainer.callback_metrics["val/answer_accuracy"].item() == pytest.approx(0.5)
    assert trainer.callback_metrics["val/answer_invalid_rate"].item() == pytest.approx(1 / 6)
    assert [(entry["stage"], entry["correct"], entry["total"]) for entry in callback.history] == [
        ("validate", 3, 6)
    ]


def test_problems_file_replaces_the_datamodule(tmp_path: Path) -> None:
    problems_file = tmp_path / "problems.jsonl"
    rows = [PROBLEMS[0], PROBLEMS[2], PROBLEMS[1]]  # right, right, wrong
    problems_file.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    callback = MathAnswerEval(problems_file=str(problems_file), num_problems=64, num_samples_logged=0)
    trainer = make_trainer(tmp_path, callback, max_epochs=1)
    with pytest.warns(UserWarning, match="num_problems=64 but .*problems.jsonl has only 3"):
        trainer.fit(ScriptedTutor(), datamodule=DataModuleWithoutProblems())
    assert [(entry["correct"], entry["total"]) for entry in callback.history] == [(2, 3)]
    assert trainer.callback_metrics["val/answer_accuracy"].item() == pytest.approx(2 / 3)


def test_bad_problems_file_fails_before_training(tmp_path: Path) -> None:
    problems_file = tmp_path / "problems.jsonl"
    problems_file.write_text(
        json.dumps(PROBLEMS[0]) + "\n" + json.dumps({"question": "Q?", "answer": "no final answer"}) + "\n"
    )
    module = ScriptedTutor()
    trainer = make_trainer(tmp_path, MathAnswerEval(problems_file=str(problems_file)))
    with pytest.raises(Phi2TutorError, match=rf"the answer of {problems_file}, line 2 \('no final answer'\)"):
        trainer.fit(module, datamodule=TinyDataModule())
    assert module.generate_calls == [] and trainer.global_step == 0


def test_clear_errors_for_missing_problems_generate_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(Phi2TutorError, match="needs held-out problems: a datamodule with eval_problems"):
        make_trainer(tmp_path, MathAnswerEval()).fit(ScriptedTutor(), datamodule=DataModuleWithoutProblems())

    class NoGenerate(ScriptedTutor):
        generate = None  # type: ignore[assignment]

    with pytest.raises(Phi2TutorError, match="NoGenerate has none"):
        make_trainer(tmp_path, MathAnswerEval()).fit(NoGenerate(), datamodule=TinyDataModule())

    with pytest.raises(Phi2TutorError, match="found no held-out problems"):
        make_trainer(tmp_path, MathAnswerEval()).fit(ScriptedTutor(), datamodule=TinyDataModule(problems=[]))

    with pytest.raises(Phi2TutorError, match="option num_problems=0 is invalid: it must be at least 1"):
        MathAnswerEval(num_problems=0)


def test_samples_markdown_escapes_cells() -> None:
    table = samples_markdown(
        [
            {
                "question": "a|b",
                "output": "x\\y\r\nz" + "w" * 500,
                "extracted": None,
                "reference": "1",
                "correct": False,
            }
        ]
    )
    row = table.splitlines()[2]
    assert row.startswith("| 1 | a\\|b | x\\\\y<br>zwww")
    assert row.endswith("w… | (none) | 1 | no |")


def test_ddp_shards_problems_and_syncs_the_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Seven problems on two processes: rank 0 solves 0, 2, 4, 6 (all right), rank 1 solves 1, 3, 5 (two wrong,
    # one invalid). The global answer is 4/7; rank 0 alone would say 1.0, a mean of per-rank rates 0.5.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    callback = MathAnswerEval(num_problems=7, num_samples_logged=8)
    trainer = make_trainer(tmp_path, callback, max_epochs=1, strategy="ddp_spawn", devices=2)
    trainer.fit(ScriptedTutor(), datamodule=TinyDataModule())
    assert trainer.callback_metrics["val/answer_accuracy"].item() == pytest.approx(4 / 7)
    assert trainer.callback_metrics["val/answer_invalid_rate"].item() == pytest.approx(1 / 7)
    # With ddp_spawn the main process's logger looks for a new version; rank 0 wrote into version_0.
    events = read_events(str(tmp_path / "logs" / "version_0"))
    assert [value for _, value in scalar_series(events, "val/answer_accuracy")] == [pytest.approx(4 / 7)]
    table = events.Tensors("val/answer_samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert [line.split(" | ")[1] for line in table.splitlines()[2:]] == [
        "What is 0 + 1?",
        "What is 2 + 1?",
        "What is 4 + 1?",
        "What is 6 + 1?",
    ]
