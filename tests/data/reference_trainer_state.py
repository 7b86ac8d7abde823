"""A Hugging Face Trainer trainer_state.json shaped like the reference run (shared/reference/
phi2-training-analysis.es.md): its loss curve, a warm-up + cosine learning rate, a grad-norm peak, its runtime.
Run it to refresh tests/data/reference_run/ (trainer_state.json and the memory.json of the same run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tests.reference_run import REFERENCE_EPOCHS, reference_loss_series

STEPS_PER_EPOCH = 20
PEAK_LEARNING_RATE = 1e-4
WARMUP_EPOCHS = 30  # ~12% of 250: the reference peaked "near epoch 31"
GRAD_NORM_PEAK = (25, 2.988)  # the reference's peak: epoch 25, value 2.988
RUNTIME_SECONDS = 1953.67 * 60  # "1 día, 8 horas, 33 minutos (1953.67 minutos)"
REPORTED_MEAN_LOSS = 0.2402  # the Trainer's train_loss, which the reference calls its "final loss"
REFERENCE_MEMORY = {  # the reference's "Uso de Memoria GPU" table, as GPUMemoryProfiler writes it
    "device": "NVIDIA GeForce GTX 1050 Ti",
    "budget_mb": 4096.0,
    "allocated_mb": 2326.09,
    "reserved_mb": 3228.0,
    "max_allocated_mb": 3087.42,
    "cpu_rss_mb": None,
    "cpu_peak_rss_mb": None,
    "percent_of_budget": 75.4,
    "samples": [],
}


def learning_rate(epoch: int) -> float:
    if epoch <= WARMUP_EPOCHS:
        return PEAK_LEARNING_RATE * epoch / WARMUP_EPOCHS
    progress = (epoch - WARMUP_EPOCHS) / (REFERENCE_EPOCHS - WARMUP_EPOCHS)
    return PEAK_LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress))


def grad_norm(epoch: int) -> float:
    if epoch == GRAD_NORM_PEAK[0]:
        return GRAD_NORM_PEAK[1]
    return 0.35 + 1.6 * math.exp(-epoch / 30) + 0.05 * math.sin(epoch)


def reference_trainer_state() -> dict[str, Any]:
    """The trainer_state.json content: one log entry per epoch (logging at each epoch's last step)."""
    losses = reference_loss_series()
    history: list[dict[str, Any]] = [
        {
            "epoch": float(epoch),
            "grad_norm": round(grad_norm(epoch), 4),
            "learning_rate": learning_rate(epoch),
            "loss": loss,
            "step": epoch * STEPS_PER_EPOCH,
        }
        for epoch, loss in zip(range(1, REFERENCE_EPOCHS + 1), losses)
    ]
    history.append(
        {
            "epoch": float(REFERENCE_EPOCHS),
            "step": REFERENCE_EPOCHS * STEPS_PER_EPOCH,
            "total_flos": 1.0e17,
            "train_loss": REPORTED_MEAN_LOSS,
            "train_runtime": RUNTIME_SECONDS,
            "train_samples_per_second": 0.5,
            "train_steps_per_second": 0.04,
        }
    )
    return {
        "best_metric": None,
        "epoch": float(REFERENCE_EPOCHS),
        "global_step": REFERENCE_EPOCHS * STEPS_PER_EPOCH,
        "logging_steps": STEPS_PER_EPOCH,
        "max_steps": REFERENCE_EPOCHS * STEPS_PER_EPOCH,
        "num_train_epochs": REFERENCE_EPOCHS,
        "train_batch_size": 1,
        "log_history": history,
    }


def write_reference_run(directory: Path, with_memory: bool = True) -> Path:
    """Write trainer_state.json (and memory.json) into ``directory``; return the trainer_state.json path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trainer_state.json"
    path.write_text(json.dumps(reference_trainer_state(), indent=2) + "\n")
    if with_memory:
        (directory / "memory.json").write_text(json.dumps(REFERENCE_MEMORY, indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(write_reference_run(Path(__file__).resolve().parent / "reference_run"))
