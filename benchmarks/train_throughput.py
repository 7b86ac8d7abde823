"""Training throughput of phi2tutor's fit against the transformers Trainer + peft recipe on the same work.

Same small Phi model and weights, same tokenized examples, micro-batch, LoRA, optimizer, steps and
threads; the sides run alternated (A B A B) in one process and the ratio is the median of the pairs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from transformers import DataCollatorForSeq2Seq, PrinterCallback, TrainerCallback, TrainingArguments  # noqa: E402
from transformers import Trainer as HFTrainer  # noqa: E402

from phi2tutor.data import MathDataModule, TokenizedDataset, TokenizedExample  # noqa: E402
from phi2tutor.loading import bundled_tokenizer_dir, load_base_model, wrap_with_lora  # noqa: E402
from phi2tutor.model import PHI2_LORA_TARGETS, TutorModule  # noqa: E402
from phi2tutor.synthetic import SyntheticSpec  # noqa: E402


@dataclass
class RunMeasurement:
    """What one training run did inside its timed window (the steps after the warm-up steps)."""

    seconds: float = 0.0
    real_tokens: int = 0
    padded_positions: int = 0
    last_loss: float = math.nan
    window_start: float | None = None
    step_losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def padding_share_pct(self) -> float:
        return 100.0 * (1.0 - self.real_tokens / max(self.padded_positions, 1))


class LightningStepClock(Callback):
    """Times the training loop from the first timed step's start to the last step's end (side A)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.measurement = RunMeasurement()

    def on_train_batch_start(
        self, trainer, pl_module, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        if trainer.global_step == self.warmup_steps:
            self.measurement.window_start = time.perf_counter()
        if trainer.global_step >= self.warmup_steps:
            self.measurement.real_tokens += int(batch["attention_mask"].sum())
            self.measurement.padded_positions += batch["attention_mask"].numel()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.measurement.window_start is not None:
            self.measurement.seconds = time.perf_counter() - self.measurement.window_start
        self.measurement.last_loss = float(outputs["loss"])


class HFStepClock(TrainerCallback):
    """The same window for transformers' Trainer; tokens are read from the model's forward inputs (side B)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.measurement = RunMeasurement()
        self.timing = False

    def count_forward_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.timing and module.training:
            mask = kwargs["attention_mask"]
            self.measurement.real_tokens += int(mask.sum())
            self.measurement.padded_positions += mask.numel()

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.warmup_steps:
            self.measurement.window_start = time.perf_counter()
            self.timing = True

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.measurement.window_start is not None:
            self.measurement.seconds = time.perf_counter() - self.measurement.window_start

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.measurement.last_loss = float(logs["loss"])


class ExampleDataset(torch.utils.data.Dataset):
    """phi2tutor's tokenized examples as the dicts the transformers collators take (prompt labels -100)."""

    def __init__(self, examples: list[TokenizedExample]) -> None:
        self.rows = [
            {
                "input_ids": e.input_ids,
                "attention_mask": [1] * len(e.input_ids),
                "labels": [-100] * e.prompt_length + e.input_ids[e.prompt_length :],
            }
            for e in examples
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_file",
        help="GSM8K-format .jsonl (question, answer) for realistic lengths; "
        "default: the bundled synthetic problems",
    )
    parser.add_argument(
        "--num_examples", type=int, default=2000, help="training examples taken from the data"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup_steps", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of A B (alternated)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on both sides (1: on a shared 2-core machine a second thread waits on other "
        "processes and runs vary threefold)",
    )
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_warmup_fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides train")
    parser.add_argument(
        "--qlora",
        action="store_true",
        help="configs/phi2-qlora-4gb.yaml's settings on both sides: nf4-double base, gradient checkpointing, "
        "paged 8-bit AdamW, and on CUDA float16 compute with 16-mixed (HF: fp16=True); on the CPU fp32 compute",
    )
    parser.add_argument(
        "--hf_group_by_length",
        action="store_true",
        help="also run side B with train_sampling_strategy=group_by_length (context, not the target)",
    )
    return parser.parse_args()


def qlora_settings(args: argparse.Namespace) -> dict[str, Any]:
    """TutorModule options of configs/phi2-qlora-4gb.yaml (with --qlora), else none."""
    if not args.qlora:
        return {}
    return {
        "quantization": "nf4-double",
        "compute_dtype": "float16" if args.device == "cuda" else "float32",
        "gradient_checkpointing": True,
        "optimizer": "paged_adamw8bit",
    }


def model_config(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "max_position_embeddings": max(2048, args.max_length),
    }


def build_datamodule(args: argparse.Namespace, group_by_length: bool) -> MathDataModule:
    common = {
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "group_by_length": group_by_length,
        "skip_invalid_rows": True,
        "seed": args.seed,
        "tokenizer_name_or_path": str(bundled_tokenizer_dir()),
    }
    if args.data_file:
        return MathDataModule(source="files", train_path=args.data_file, **common)
    spec = SyntheticSpec(train_size=args.num_examples, val_size=16, test_size=16, seed=args.seed)
    return MathDataModule(source="synthetic", synthetic=spec, **common)


def tokenized_train_examples(args: argparse.Namespace) -> tuple[MathDataModule, list[TokenizedExample]]:
    datamodule = build_datamodule(args, group_by_length=False)
    datamodule.setup("fit")
    examples = datamodule.datasets["train"].examples[: args.num_examples]
    return datamodule, examples


def run_phi2tutor(
    args: argparse.Namespace, config: dict, examples: list[TokenizedExample], tokenizer, group_by_length: bool
) -> RunMeasurement:
    """Side A: Lightning Trainer + TutorModule + MathDataModule, logger and checkpointing off."""
    torch.set_num_threads(args.threads)
    datamodule = build_datamodule(args, group_by_length)
    # Tokenized once for both sides: setup() keeps datasets and tokenizer that are already there.
    datamodule.tokenizer = tokenizer
    datamodule.datasets = {
        "train": TokenizedDataset(list(examples)),
        "val": TokenizedDataset(list(examples[:1])),
    }
    module = TutorModule(
        model_config=config,
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
        **qlora_settings(args),
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        learning_rate=args.learning_rate,
        warmup_fraction=args.lr_warmup_fraction,
        init_seed=args.seed,
    )
    # Built here, under the seed side B uses, so both start from the same base and LoRA weights.
    torch.manual_seed(args.seed)
    module.configure_model()
    clock = LightningStepClock(args.warmup_steps)
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        precision="16-mixed" if args.qlora and args.device == "cuda" else "32-true",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=datamodule)
    return clock.measurement


def run_hf_trainer(
    args: argparse.Namespace, config: dict, examples: list[TokenizedExample], tokenizer, sampling: str
) -> RunMeasurement:
    """Side B: transformers Trainer on a peft model, padded by DataCollatorForSeq2Seq (labels -100)."""
    torch.set_num_threads(args.threads)
    settings = qlora_settings(args)
    base = load_base_model(
        "phi-tiny",
        config,
        settings.get("quantization", "none"),
        settings.get("compute_dtype", "float32"),
        "sdpa",
        init_seed=args.seed,
    )
    if args.qlora:
        base.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input (as TutorModule)
    torch.manual_seed(args.seed)
    model = wrap_with_lora(
        base, None, args.lora_r, args.lora_alpha, args.lora_dropout, list(PHI2_LORA_TARGETS), None
    )
    clock = HFStepClock(args.warmup_steps)
    hook = model.register_forward_pre_hook(clock.count_forward_inputs, with_kwargs=True)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=args.lr_warmup_fraction,
            optim="paged_adamw_8bit" if args.qlora else "adamw_torch",
            fp16=args.qlora and args.device == "cuda",
            gradient_checkpointing=args.qlora,
            gradient_checkpointing_kwargs={"use_reentrant": False} if args.qlora else None,
            weight_decay=0.0,
            max_grad_norm=1.0,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            dataloader_num_workers=0,
            use_cpu=args.device == "cpu",
            disable_tqdm=True,
            seed=args.seed,
            train_sampling_strategy=sampling,
        )
        trainer = HFTrainer(
            model=model,
            args=training_args,
            train_dataset=ExampleDataset(examples),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # one summary line per run is enough
        trainer.train()
    hook.remove()
    return clock.measurement


def describe(name: str, runs: list[RunMeasurement]) -> str:
    rates = [r.tokens_per_second for r in runs]
    return (
        f"{name:<34} tokens/s median {statistics.median(rates):8.0f}  (runs: "
        f"{', '.join(f'{x:.0f}' for x in rates)})  padding {statistics.median(r.padding_share_pct for r in runs):5.1f}%"
        f"  last loss {runs[-1].last_loss:.4f}"
    )


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_throughput.py --device cuda: no CUDA device is visible")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "phi2tutor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    datamodule, examples = tokenized_train_examples(args)
    tokenizer = datamodule.tokenizer
    config = model_config(args, len(tokenizer))
    lengths = [len(e.input_ids) for e in examples]
    print(
        f"data: {args.data_file or 'bundled synthetic problems'} | {len(examples)} examples, tokens per "
        f"example median {statistics.median(lengths):.0f} max {max(lengths)} | micro-batch {args.batch_size} | "
        f"steps {args.steps} (first {args.warmup_steps} untimed) | model hidden {args.hidden_size} x "
        f"{args.layers} layers | LoRA r {args.lora_r} on {','.join(PHI2_LORA_TARGETS)} | threads {args.threads} | "
        f"device {args.device}{' | QLoRA (the 4 GB config)' if args.qlora else ''}"
    )
    sides: dict[str, Any] = {
        "A phi2tutor fit, plain padding": lambda: run_phi2tutor(
            args, config, examples, tokenizer, group_by_length=False
        ),
        "A phi2tutor fit, length-grouped": lambda: run_phi2tutor(
            args, config, examples, tokenizer, group_by_length=True
        ),
        "B HF Trainer + peft": lambda: run_hf_trainer(args, config, examples, tokenizer, "random"),
    }
    if args.hf_group_by_length:
        sides["B HF Trainer + peft, group_by_length"] = lambda: run_hf_trainer(
            args, config, examples, tokenizer, "group_by_length"
        )
    runs: dict[str, list[RunMeasurement]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, run in sides.items():
            measurement = run()
            runs[name].append(measurement)
            print(
                f"  round {repeat + 1} {name}: {measurement.tokens_per_second:.0f} tokens/s, "
                f"{measurement.seconds:.1f} s timed, loss {measurement.last_loss:.4f}",
                flush=True,
            )
    print()
    for name, measured in runs.items():
        print(describe(name, measured))

    def median_ratio(a_name: str, b_name: str) -> float:
        return statistics.median(
            a.tokens_per_second / b.tokens_per_second for a, b in zip(runs[a_name], runs[b_name])
        )

    hf = "B HF Trainer + peft"
    plain_ratio = median_ratio("A phi2tutor fit, plain padding", hf)
    grouped_ratio = median_ratio("A phi2tutor fit, length-grouped", hf)
    print(f"ratio A/B plain padding:  {plain_ratio:.3f}  (target >= 1.0)")
    print(f"ratio A/B length-grouped: {grouped_ratio:.3f}  (target >= 1.2)")
    if args.hf_group_by_length:
        ratio = median_ratio("A phi2tutor fit, length-grouped", "B HF Trainer + peft, group_by_length")
        print(f"ratio A length-grouped / B group_by_length: {ratio:.3f}  (context)")
    grouped_padding = statistics.median(r.padding_share_pct for r in runs["A phi2tutor fit, length-grouped"])
    hf_padding = statistics.median(r.padding_share_pct for r in runs[hf])
    print(
        f"RESULT train_speedup_vs_hf_trainer={grouped_ratio:.3f} padding_share_pct={grouped_padding:.1f} "
        f"plain_padding_speedup={plain_ratio:.3f} hf_padding_share_pct={hf_padding:.1f}"
    )


if __name__ == "__main__":
    main()
