"""Callback overhead: the same phi2tutor fit with all of its callbacks on and off, alternated, compared
in training tokens/s. Validation (and so MathAnswerEval's generation) is left out of the timed loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from callbacks.math_eval import MathAnswerEval  # noqa: E402
from callbacks.memory import GPUMemoryProfiler  # noqa: E402
from callbacks.phases import PhaseDetection  # noqa: E402
from callbacks.plateau import PlateauStopping  # noqa: E402
from phi2tutor.data import MathDataModule  # noqa: E402
from phi2tutor.loading import bundled_tokenizer_dir  # noqa: E402
from phi2tutor.model import TutorModule  # noqa: E402
from phi2tutor.synthetic import SyntheticSpec  # noqa: E402


class LoopTiming:
    """Training-loop seconds and tokens after the warm-up steps, validation time taken out."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.validation_start: float | None = None
        self.validation_seconds = 0.0
        self.real_tokens = 0
        # Per optimizer step: seconds from the previous step's end to this one's (validation taken out).
        self.step_seconds: list[float] = []
        self._previous_end: float | None = None
        self._validation_at_previous_end = 0.0

    @property
    def training_seconds(self) -> float:
        return self.window_end - self.window_start - self.validation_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.training_seconds


class ClockFirst(Callback):
    """Placed before every other callback: its start hooks run first."""

    def __init__(self, timing: LoopTiming) -> None:
        self.timing = timing

    def on_train_batch_start(
        self, trainer, pl_module, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        if trainer.global_step == self.timing.warmup_steps and self.timing.window_start is None:
            self.timing.window_start = time.perf_counter()
        if self.timing.window_start is not None:
            self.timing.real_tokens += int(batch["attention_mask"].sum())

    def on_validation_start(self, trainer, pl_module) -> None:
        self.timing.validation_start = time.perf_counter()


class ClockLast(Callback):
    """Placed after every other callback: its end hooks run last, so the others' work is inside."""

    def __init__(self, timing: LoopTiming) -> None:
        self.timing = timing

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        timing = self.timing
        if timing.window_start is None:
            return
        timing.window_end = time.perf_counter()
        if timing._previous_end is not None:
            validation = timing.validation_seconds - timing._validation_at_previous_end
            timing.step_seconds.append(timing.window_end - timing._previous_end - validation)
        timing._previous_end = timing.window_end
        timing._validation_at_previous_end = timing.validation_seconds

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.timing.window_start is not None and trainer.state.fn == "fit":
            self.timing.validation_seconds += time.perf_counter() - self.timing.validation_start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train_size", type=int, default=192, help="generated training problems")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of on/off (alternated)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see train_throughput.py)")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    return parser.parse_args()


def all_callbacks() -> list[Callback]:
    """Every phi2tutor callback plus what the CLI and the 4 GB config add, at their default cadence."""
    callbacks: list[Callback] = [
        LearningRateMonitor(logging_interval="step"),
        PhaseDetection(),
        PlateauStopping(),
        MathAnswerEval(num_problems=8, batch_size=8, max_new_tokens=16, num_samples_logged=2),
        GPUMemoryProfiler(),
        ModelCheckpoint(monitor="val/loss", mode="min", save_last=True, save_top_k=1),
    ]
    try:
        from callbacks.report import TrainingReport

        callbacks.append(TrainingReport(figures=False))
    except ImportError:  # not every checkout has it yet
        pass
    return callbacks


def run_fit(args: argparse.Namespace, callbacks_on: bool, run_dir: Path) -> LoopTiming:
    torch.set_num_threads(args.threads)
    timing = LoopTiming(args.warmup_steps)
    datamodule = MathDataModule(
        source="synthetic",
        synthetic=SyntheticSpec(train_size=args.train_size, val_size=16, test_size=16, seed=0),
        batch_size=args.batch_size,
        max_length=256,
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
    )
    module = TutorModule(
        model_config={
            "vocab_size": 512,
            "hidden_size": args.hidden_size,
            "intermediate_size": 4 * args.hidden_size,
            "num_hidden_layers": args.layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
        },
        lora_r=8,
        learning_rate=1e-3,
        max_new_tokens=16,
    )
    callbacks = all_callbacks() if callbacks_on else []
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        log_every_n_steps=1,
        gradient_clip_val=1.0,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="lightning_logs", default_hp_metric=False),
        enable_checkpointing=callbacks_on,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ClockFirst(timing), *callbacks, ClockLast(timing)],
        default_root_dir=str(run_dir),
    )
    torch.manual_seed(0)
    trainer.fit(module, datamodule=datamodule)
    return timing


def main() -> None:
    args = parse_args()
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "phi2tutor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(
        f"fit: {args.train_size} generated problems x {args.epochs} epochs, micro-batch {args.batch_size}, "
        f"model hidden {args.hidden_size} x {args.layers} layers, threads {args.threads}, TensorBoard logger on "
        f"both sides; callbacks on: {', '.join(type(c).__name__ for c in all_callbacks())}"
    )
    rates: dict[bool, list[float]] = {True: [], False: []}
    step_ratios: list[float] = []
    validation: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for callbacks_on in (True, False):
                timing = run_fit(args, callbacks_on, Path(scratch) / f"{repeat}-{callbacks_on}")
                rates[callbacks_on].append(timing.tokens_per_second)
                if callbacks_on:
                    on_steps = timing.step_seconds
                else:
                    # Both fits see the same batches in the same order: compare step by step.
                    step_ratios.extend(off / on for on, off in zip(on_steps, timing.step_seconds))
                validation[callbacks_on].append(timing.validation_seconds)
                print(
                    f"  round {repeat + 1} callbacks {'on ' if callbacks_on else 'off'}: "
                    f"{timing.tokens_per_second:.0f} tokens/s over {timing.training_seconds:.1f} s of training "
                    f"(validation {timing.validation_seconds:.1f} s, not counted)",
                    flush=True,
                )
    window_ratio = statistics.median(on / off for on, off in zip(rates[True], rates[False]))
    # Other processes on the machine slow whole stretches of a run; the median over paired steps is
    # what the callbacks cost, the ratio of whole windows is shown beside it.
    ratio = statistics.median(step_ratios)
    for callbacks_on in (True, False):
        print(
            f"callbacks {'on ' if callbacks_on else 'off'}: tokens/s median {statistics.median(rates[callbacks_on]):.0f}"
            f" (runs: {', '.join(f'{x:.0f}' for x in rates[callbacks_on])})"
        )
    overhead_pct = 100.0 * (1.0 - ratio)
    print(f"tokens/s ratio on/off, median of paired steps ({len(step_ratios)}): {ratio:.3f}")
    print(f"tokens/s ratio on/off, median of paired whole runs: {window_ratio:.3f}")
    print(f"overhead {overhead_pct:.1f}% (target <= 3%)")
    print(
        f"RESULT callback_overhead_pct={overhead_pct:.2f} callbacks_on_off_ratio={ratio:.3f} "
        f"whole_run_ratio={window_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
