"""Peak memory of a QLoRA training run with configs/phi2-qlora-4gb.yaml's settings, measured beside the
planner's estimate (phi2tutor.memory): on a GPU Phi-2's real 2.7B shape with random fp16 weights, loaded the
way Phi-2 is; without CUDA a small model of the same class, whose resident memory is context only.

Model: a PhiForCausalLM of the chosen shape is initialised directly in fp16 (values change neither memory
nor speed) and saved in a child process, then TutorModule loads it by path, as it loads microsoft/phi-2:
from_pretrained with a BitsAndBytesConfig (bitsandbytes places a quantized load on the current CUDA device),
LoRA, gradient checkpointing, the config's optimizer, all read from the YAML so they stay in sync.
Training: a real lightning Trainer with the config's precision (16-mixed: fp16 autocast and a GradScaler;
on the CPU the same through MixedPrecision('16-mixed', 'cpu'), which Lightning would otherwise turn into
bf16) for --steps optimizer steps of micro-batches of random token ids whose last --answer_fraction
positions carry labels, as a prompt-masked answer does.

Last line: RESULT peak_allocated_mb=... planner_estimate_mb=... estimate_ratio=... measure=...
  CUDA: peak_allocated_mb is torch.cuda.max_memory_allocated over loading and training (MiB), the estimate
        is the planner's estimated_peak_allocated_mb, estimate_ratio = estimate / measured (1.0 is exact,
        above 1 the planner over-estimates); measure=cuda_max_allocated.
  CPU:  peak_allocated_mb is the growth of the process's resident memory (peak RSS after fit minus RSS
        before loading; includes allocator caching, mapped weight files and lazily loaded libraries) and
        the ratio compares a CUDA model with it: context only; measure=cpu_peak_rss_delta.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from callbacks.memory import cpu_peak_rss_mb, cpu_rss_mb  # noqa: E402
from phi2tutor.loading import bundled_tokenizer_dir  # noqa: E402
from phi2tutor.memory import (  # noqa: E402
    KNOWN_MODEL_CONFIGS,
    MB,
    MemoryEstimate,
    format_breakdown_table,
    plan_from_config_dict,
)
from phi2tutor.model import TutorModule  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "phi2-qlora-4gb.yaml"
PHI2_SHAPE: dict[str, Any] = dict(KNOWN_MODEL_CONFIGS["microsoft/phi-2"])  # the planner's own table
# Phi-2's proportions (head dim 80, intermediate = 4 x hidden, rotary share) at a size two CPU cores train
# fast. The head dim matters: 0.4 x 64 is not a whole rotary width and Phi's rope then fails. The vocabulary
# is cut because fp16 matmuls on the CPU have no fast kernel: lm_head's backward at 51200 took ~6 s a step.
SMALL_SHAPE: dict[str, Any] = {
    **PHI2_SHAPE,
    "vocab_size": 2048,
    "hidden_size": 320,
    "intermediate_size": 1280,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
SMALL_MAX_LENGTH = 256
# The model fields of the YAML that decide memory and speed; the rest (hub id, adapter_output_dir, ...)
# would load a real model or write files.
MODEL_FIELDS = (
    "quantization",
    "compute_dtype",
    "attn_implementation",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "modules_to_save",
    "gradient_checkpointing",
    "embeddings_on_cpu",
    "offload_checkpoints",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "warmup_fraction",
    "min_lr_ratio",
)


@dataclass
class TrainingMeasurement:
    """What the timed part of the run did, and the memory it took."""

    seconds: float
    tokens: int
    peak_allocated_mb: float
    peak_reserved_mb: float | None
    device_used_mb: float | None
    optimizer_states_created: bool
    last_loss: float
    loss_scale: float | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


class RandomAnswerBatches(Dataset):
    """Random token ids of full length; labels on the last ``answer_positions`` (a prompt-masked answer)."""

    def __init__(
        self, count: int, max_length: int, vocab_size: int, answer_positions: int, seed: int
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, vocab_size, (count, max_length), generator=generator)
        self.answer_positions = answer_positions

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.input_ids[index]
        labels = torch.full_like(input_ids, -100)
        labels[-self.answer_positions :] = input_ids[-self.answer_positions :]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class StepClock(Callback):
    """Times micro-batches from ``warmup_batches`` on (the first optimizer step allocates and warms up)."""

    def __init__(self, warmup_batches: int, on_cuda: bool) -> None:
        self.warmup_batches = warmup_batches
        self.on_cuda = on_cuda
        self.started: float | None = None
        self.ended: float | None = None
        self.tokens = 0

    def _now(self) -> float:
        if self.on_cuda:
            torch.cuda.synchronize()  # kernels are asynchronous: time the work, not its launch
        return time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup_batches:
            self.started = self._now()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx >= self.warmup_batches:
            self.ended = self._now()
            self.tokens += int(batch["attention_mask"].sum())

    @property
    def seconds(self) -> float:
        return (self.ended - self.started) if self.started and self.ended else math.nan


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML whose settings are used")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (Trainer max_steps)")
    parser.add_argument(
        "--accumulate_grad_batches",
        type=int,
        help="micro-batches per optimizer step; default: the config's on CUDA, 1 on the CPU (keeps it "
        "under 2 minutes). Above 1, LoRA gradients stay allocated across micro-batches.",
    )
    parser.add_argument("--micro_batch", type=int, help="default: the config's data.batch_size")
    parser.add_argument(
        "--max_length",
        type=int,
        help=f"tokens per example; default: the config's on CUDA, {SMALL_MAX_LENGTH} small",
    )
    parser.add_argument(
        "--answer_fraction", type=float, default=0.4, help="share of positions (the last ones) with labels"
    )
    parser.add_argument(
        "--shape",
        choices=("auto", "phi2", "small"),
        default="auto",
        help="model shape: Phi-2's 2.7B (default with CUDA) or a small Phi (hidden 320, 4 layers, vocab 2048; default on the CPU)",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads. 1 by default: on a shared, busy CPU two OpenMP threads wait on each other at "
        "every op (measured 12 ms instead of 0.17 ms for an elementwise op on 2 cores)",
    )
    parser.add_argument("--budget_mb", type=float, default=4096.0, help="card budget for the planner table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_breakdown", action="store_true", help="leave out the planner's term table")
    return parser.parse_args()


def write_random_checkpoint(shape: dict[str, Any], directory: str, device: str, seed: int) -> None:
    """Save a randomly initialised fp16 PhiForCausalLM of ``shape`` (run in a child process).

    Initialised directly in fp16 (on the GPU when there is one): an fp32 Phi-2 on the host would take
    ~11 GB and minutes. A child process keeps its memory out of the measured process's peaks.
    """
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    config = PhiConfig(**shape)
    with torch.device(device):
        model = PhiForCausalLM._from_config(config, dtype=torch.float16)
    model.save_pretrained(directory)


def build_checkpoint_in_child(shape: dict[str, Any], directory: Path, device: str, seed: int) -> None:
    context = multiprocessing.get_context("spawn")  # a fresh CUDA context, freed when the child exits
    child = context.Process(target=write_random_checkpoint, args=(shape, str(directory), device, seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"building the random checkpoint failed (child exit code {child.exitcode})")


def read_config(path: Path) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(path.read_text()) or {}
    return {name: dict(config.get(name) or {}) for name in ("model", "data", "trainer")}


def trainer_precision_args(precision: str, on_cuda: bool) -> dict[str, Any]:
    """The Trainer's keyword arguments for ``precision``: on the CPU 16-mixed needs the plugin."""
    if not on_cuda and precision == "16-mixed":
        # Lightning maps 16-mixed on the CPU to bf16-mixed; the plugin keeps fp16 autocast and the scaler.
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": precision}


def train_and_measure(
    module: TutorModule,
    loader: DataLoader,
    trainer_settings: dict[str, Any],
    on_cuda: bool,
    warmup_batches: int,
    root_dir: str,
) -> tuple[TrainingMeasurement, Trainer]:
    clock = StepClock(warmup_batches, on_cuda)
    trainer = Trainer(
        accelerator="gpu" if on_cuda else "cpu",
        devices=1,
        max_steps=trainer_settings["max_steps"],
        accumulate_grad_batches=trainer_settings["accumulate_grad_batches"],
        gradient_clip_val=trainer_settings.get("gradient_clip_val"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root_dir,
        callbacks=[clock],
        **trainer_precision_args(trainer_settings["precision"], on_cuda),
    )
    trainer.fit(module, train_dataloaders=loader)
    optimizer = trainer.optimizers[0]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    loss = trainer.callback_metrics.get("train/loss")
    measurement = TrainingMeasurement(
        seconds=clock.seconds,
        tokens=clock.tokens,
        peak_allocated_mb=math.nan,
        peak_reserved_mb=None,
        device_used_mb=None,
        # An fp16 overflow on every step would skip every optimizer step and with it the state allocation.
        optimizer_states_created=len(optimizer.state) > 0,
        last_loss=float(loss) if loss is not None else math.nan,
        loss_scale=float(scaler.get_scale()) if scaler is not None else None,
    )
    if on_cuda:
        measurement.peak_allocated_mb = torch.cuda.max_memory_allocated() / MB
        measurement.peak_reserved_mb = torch.cuda.max_memory_reserved() / MB
        free, total = torch.cuda.mem_get_info()
        measurement.device_used_mb = (total - free) / MB
    return measurement, trainer


def planner_estimate(
    model_settings: dict[str, Any],
    shape: dict[str, Any],
    micro_batch: int,
    max_length: int,
    precision: str,
    accumulate_grad_batches: int,
    loss_token_fraction: float,
) -> MemoryEstimate:
    config = {
        "model": {**model_settings, "model_config": shape},
        "data": {"batch_size": micro_batch, "max_length": max_length},
        "trainer": {"precision": precision, "accumulate_grad_batches": accumulate_grad_batches},
    }
    return plan_from_config_dict(
        config, source="benchmarks/memory_phi2.py", loss_token_fraction=loss_token_fraction
    )


def main() -> None:
    args = parse_args()
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "phi2tutor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    on_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    use_phi2 = on_cuda if args.shape == "auto" else args.shape == "phi2"
    shape = PHI2_SHAPE if use_phi2 else SMALL_SHAPE
    config = read_config(args.config)
    model_settings = {k: v for k, v in config["model"].items() if k in MODEL_FIELDS}
    micro_batch = args.micro_batch or int(config["data"].get("batch_size", 1))
    max_length = args.max_length or (
        int(config["data"].get("max_length", 512)) if use_phi2 else SMALL_MAX_LENGTH
    )
    accumulate = args.accumulate_grad_batches or (
        int(config["trainer"].get("accumulate_grad_batches") or 1) if on_cuda else 1
    )
    answer_positions = max(1, round(args.answer_fraction * max_length))
    # target_token_loss shifts labels by one: every labelled position but position 0 is a target.
    loss_token_fraction = min(answer_positions, max_length - 1) / max_length
    precision = str(config["trainer"].get("precision", "32-true"))
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(
        f"config {args.config.name} | device {device_name} | shape {'Phi-2 2.7B' if use_phi2 else 'small Phi'} "
        f"(hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}) | "
        f"{model_settings.get('quantization')} base, compute {model_settings.get('compute_dtype')}, LoRA r "
        f"{model_settings.get('lora_r')}, {model_settings.get('optimizer')}, checkpointing "
        f"{model_settings.get('gradient_checkpointing')} | precision {precision} | micro-batch {micro_batch} x "
        f"{max_length} tokens, labels on the last {answer_positions} | {args.steps} steps x {accumulate} "
        f"micro-batches | threads {args.threads}",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="phi2tutor-memory-") as work_dir:
        checkpoint_dir = Path(work_dir) / "random-phi"
        started = time.perf_counter()
        build_checkpoint_in_child(shape, checkpoint_dir, "cuda" if on_cuda else "cpu", args.seed)
        print(f"random fp16 checkpoint written in {time.perf_counter() - started:.1f} s", flush=True)

        module = TutorModule(
            model_name_or_path=str(checkpoint_dir),
            tokenizer_name_or_path=str(bundled_tokenizer_dir()),  # ids are random; any tokenizer will do
            init_seed=args.seed,
            **model_settings,
        )
        batches = RandomAnswerBatches(
            args.steps * accumulate * micro_batch,
            max_length,
            shape["vocab_size"],
            answer_positions,
            args.seed,
        )
        loader = DataLoader(batches, batch_size=micro_batch, shuffle=False)
        trainer_settings = {
            "precision": precision,
            "max_steps": args.steps,
            "accumulate_grad_batches": accumulate,
            "gradient_clip_val": config["trainer"].get("gradient_clip_val"),
        }
        # The first optimizer step creates optimizer states and warms kernels up: not timed.
        warmup_batches = accumulate if args.steps > 1 else 0
        gc.collect()
        rss_before = cpu_rss_mb() or math.nan
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        measurement, trainer = train_and_measure(
            module, loader, trainer_settings, on_cuda, warmup_batches, work_dir
        )
        fit_seconds = time.perf_counter() - started
        peak_rss = cpu_peak_rss_mb()
    rss_delta = peak_rss - rss_before
    if not on_cuda:
        measurement.peak_allocated_mb = rss_delta

    estimate = planner_estimate(
        model_settings,
        shape,
        micro_batch,
        max_length,
        str(trainer.precision),
        accumulate,
        loss_token_fraction,
    )
    if not args.no_breakdown:
        print(format_breakdown_table(estimate, args.budget_mb))
    estimate_mb = estimate.estimated_peak_allocated_mb
    ratio = estimate_mb / measurement.peak_allocated_mb if measurement.peak_allocated_mb > 0 else math.nan
    print(
        f"fit {fit_seconds:.1f} s (loading included) | timed {measurement.seconds:.1f} s | "
        f"{measurement.tokens_per_second:.0f} tokens/s | last train/loss {measurement.last_loss:.3f} | "
        f"optimizer states created: {'yes' if measurement.optimizer_states_created else 'NO (all steps skipped)'}"
        + (f" | loss scale {measurement.loss_scale:.0f}" if measurement.loss_scale is not None else "")
    )
    if on_cuda:
        reserve = estimate.settings["allocator_overhead_fraction"]
        print(
            f"measured  max_memory_allocated {measurement.peak_allocated_mb:9.1f} MB | max_memory_reserved "
            f"{measurement.peak_reserved_mb:9.1f} MB | device in use after fit (mem_get_info, incl. CUDA "
            f"context and paged states) {measurement.device_used_mb:9.1f} MB"
        )
        print(
            f"planner   peak allocated       {estimate_mb:9.1f} MB | allocated x (1 + {reserve:.2f})  "
            f"{estimate_mb * (1 + reserve):9.1f} MB | peak on the card {estimate.estimated_peak_mb:9.1f} MB"
        )
        print(f"estimate / measured allocated: {ratio:.3f}")
    else:
        print(
            f"measured  RSS before loading {rss_before:.1f} MB | peak RSS {peak_rss:.1f} MB | growth "
            f"{rss_delta:.1f} MB (process memory: context only, the planner models CUDA)"
        )
        print(f"planner   peak allocated (CUDA model of this small config) {estimate_mb:.1f} MB")
        print(f"estimate / RSS growth: {ratio:.3f} (context)")
    print(
        f"RESULT peak_allocated_mb={measurement.peak_allocated_mb:.1f} planner_estimate_mb={estimate_mb:.1f} "
        f"estimate_ratio={ratio:.3f} tokens_per_s={measurement.tokens_per_second:.1f} "
        f"measure={'cuda_max_allocated' if on_cuda else 'cpu_peak_rss_delta'}"
    )


if __name__ == "__main__":
    main()
