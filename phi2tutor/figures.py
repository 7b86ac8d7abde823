"""The training report's figures as PNG files: loss with the phases shaded, grad norm and learning rate on
twin axes, memory against the budget, answer accuracy by epoch. Matplotlib's Agg canvas only, imported
when a figure is drawn, so no display and no global backend switch are needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi2tutor.keys import MEMORY_PREFIX

LABELS = {
    "en": {
        "epoch": "epoch",
        "step": "optimizer step",
        "loss": "train loss",
        "loss_step": "loss per step",
        "loss_epoch": "epoch mean loss",
        "loss_title": "Training loss and learning phases",
        "grad_norm": "grad norm",
        "learning_rate": "learning rate",
        "grad_lr_title": "Gradient norm and learning rate",
        "memory_mb": "MB",
        "memory_title": "Memory during training",
        "budget": "budget",
        "accuracy": "answer accuracy (%)",
        "accuracy_title": "Answer accuracy on held-out problems",
        "phase": "phase",
    },
    "es": {
        "epoch": "época",
        "step": "paso del optimizador",
        "loss": "pérdida de entrenamiento",
        "loss_step": "pérdida por paso",
        "loss_epoch": "pérdida media de la época",
        "loss_title": "Pérdida de entrenamiento y fases del aprendizaje",
        "grad_norm": "norma del gradiente",
        "learning_rate": "learning rate",
        "grad_lr_title": "Norma del gradiente y learning rate",
        "memory_mb": "MB",
        "memory_title": "Memoria durante el entrenamiento",
        "budget": "presupuesto",
        "accuracy": "aciertos de la respuesta (%)",
        "accuracy_title": "Aciertos en problemas reservados",
        "phase": "fase",
    },
}
PHASE_COLORS = ("#fde0c5", "#d4e8f7", "#dff2d8")

FIGURE_FILES = {
    "loss": "loss.png",
    "grad_norm_lr": "grad_norm_lr.png",
    "memory": "memory.png",
    "answer_accuracy": "answer_accuracy.png",
}


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)


def plot_loss(
    path: Path,
    step_losses: list[tuple[float, float]],
    epoch_losses: list[tuple[int, float]],
    phases: list[dict[str, Any]],
    phase_names: list[str],
    language: str,
) -> None:
    """Per-step loss at fractional epochs, epoch means at whole epochs, each phase's epochs shaded."""
    text = LABELS[language]
    figure = _new_figure()
    axes = figure.add_subplot()
    for phase, name, color in zip(phases, phase_names, PHASE_COLORS):
        # Epoch e covers (e - 1, e] on this axis: its last step sits at x = e, on its mean's marker.
        axes.axvspan(phase["first_epoch"] - 1, phase["last_epoch"], color=color, alpha=0.8, label=name)
    if step_losses:
        axes.plot(*zip(*step_losses), color="#9aa5b1", linewidth=0.8, label=text["loss_step"])
    if epoch_losses:
        axes.plot(*zip(*epoch_losses), color="#1f4e79", marker="o", markersize=3, label=text["loss_epoch"])
    axes.set_xlabel(text["epoch"])
    axes.set_ylabel(text["loss"])
    axes.set_title(text["loss_title"])
    axes.legend(loc="upper right", fontsize=8)
    _save(figure, path)


def plot_grad_norm_and_lr(
    path: Path,
    grad_norms: list[tuple[float, float]],
    learning_rates: list[tuple[float, float]],
    language: str,
) -> None:
    """Grad norm on the left axis, learning rate on the right, both against the epoch."""
    text = LABELS[language]
    figure = _new_figure()
    left = figure.add_subplot()
    handles = []
    if grad_norms:
        handles += left.plot(*zip(*grad_norms), color="#c0392b", linewidth=0.9, label=text["grad_norm"])
    left.set_xlabel(text["epoch"])
    left.set_ylabel(text["grad_norm"], color="#c0392b")
    if learning_rates:
        right = left.twinx()
        handles += right.plot(
            *zip(*learning_rates), color="#2471a3", linewidth=1.5, label=text["learning_rate"]
        )
        right.set_ylabel(text["learning_rate"], color="#2471a3")
        right.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    left.set_title(text["grad_lr_title"])
    left.legend(handles=handles, loc="upper right", fontsize=8)
    _save(figure, path)


def plot_memory(
    path: Path, series: dict[str, list[tuple[int, float]]], budget_mb: float | None, language: str
) -> None:
    """Every memory/* series over optimizer steps, with the budget as a horizontal line."""
    text = LABELS[language]
    figure = _new_figure()
    axes = figure.add_subplot()
    for tag, points in series.items():
        axes.plot(*zip(*points), marker=".", label=tag.removeprefix(MEMORY_PREFIX))
    if budget_mb is not None:
        axes.axhline(budget_mb, color="#c0392b", linestyle="--", label=f"{text['budget']} {budget_mb:g} MB")
    axes.set_xlabel(text["step"])
    axes.set_ylabel(text["memory_mb"])
    axes.set_title(text["memory_title"])
    axes.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def plot_answer_accuracy(path: Path, accuracy_pct: list[tuple[int, float]], language: str) -> None:
    """Answer accuracy (%) at each evaluated epoch."""
    text = LABELS[language]
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.plot(*zip(*accuracy_pct), color="#1e8449", marker="o")
    axes.set_ylim(-2, 102)
    axes.set_xlabel(text["epoch"])
    axes.set_ylabel(text["accuracy"])
    axes.set_title(text["accuracy_title"])
    axes.grid(alpha=0.3)
    _save(figure, path)
