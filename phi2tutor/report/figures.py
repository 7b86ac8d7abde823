"""The training report's figures as PNG files: training and validation loss with the phases shaded, grad
norm and learning rate, memory against the budget, answer accuracy by epoch. Every axis ends where its data
end, a loss spanning more than a factor of ten is drawn on a log scale, the first NaN/inf is marked, and an
axis with no data is not drawn. Matplotlib's Agg canvas only, imported when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from phi2tutor.keys import MEMORY_PREFIX

LABELS = {
    "en": {
        "epoch": "epoch",
        "step": "optimizer step",
        "loss": "loss",
        "loss_step": "train loss (logged points)",
        "loss_epoch": "train loss, epoch mean",
        "val_loss": "validation loss",
        "loss_title": "Loss: {run}",
        "log_scale": " (log scale)",
        "grad_norm": "grad norm",
        "learning_rate": "learning rate",
        "grad_lr_title": "Gradient norm and learning rate: {run}",
        "memory_mb": "MB",
        "memory_title": "Memory during training: {run}",
        "budget": "budget",
        "accuracy": "answer accuracy (%)",
        "accuracy_title": "Answer accuracy on held-out problems: {run}",
        "nonfinite": "first NaN/inf (step {step})",
        "best_val": "best validation loss",
    },
    "es": {
        "epoch": "época",
        "step": "paso del optimizador",
        "loss": "pérdida",
        "loss_step": "pérdida de entrenamiento (puntos registrados)",
        "loss_epoch": "pérdida de entrenamiento, media de la época",
        "val_loss": "pérdida de validación",
        "loss_title": "Pérdida: {run}",
        "log_scale": " (escala logarítmica)",
        "grad_norm": "norma del gradiente",
        "learning_rate": "learning rate",
        "grad_lr_title": "Norma del gradiente y learning rate: {run}",
        "memory_mb": "MB",
        "memory_title": "Memoria durante el entrenamiento: {run}",
        "budget": "presupuesto",
        "accuracy": "aciertos de la respuesta (%)",
        "accuracy_title": "Aciertos en problemas reservados: {run}",
        "nonfinite": "primer NaN/inf (paso {step})",
        "best_val": "mejor pérdida de validación",
    },
}
PHASE_COLORS = ("#fde0c5", "#d4e8f7", "#dff2d8")
LOG_SCALE_SPAN = 10.0
"""A loss whose largest and smallest positive values differ by more than this factor gets a log axis."""

FIGURE_FILES = {
    "loss": "loss.png",
    "grad_norm_lr": "grad_norm_lr.png",
    "memory": "memory.png",
    "answer_accuracy": "answer_accuracy.png",
}

XY = list[tuple[float, float]]


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)


def _finite(points: XY) -> XY:
    """Points with non-finite values as NaN, so the line breaks there instead of drawing inf."""
    return [(x, y if math.isfinite(y) else math.nan) for x, y in points]


def _x_limits(axes, *series: XY) -> None:
    xs = [x for points in series for x, _ in points]
    if xs and max(xs) > min(xs):
        axes.set_xlim(min(xs), max(xs))


def plot_loss(
    path: Path,
    *,
    run_name: str,
    unit: str,
    train: XY,
    epoch_means: XY,
    validation: XY,
    phase_spans: list[tuple[float, float, str]],
    nonfinite_x: float | None,
    nonfinite_step: int | None,
    best_validation: tuple[float, float] | None,
    language: str,
) -> None:
    """Training loss at its logged points, epoch means where their points lie, validation loss, the phases
    (x from, x to, name) shaded, the first non-finite value marked."""
    text = LABELS[language]
    figure = _new_figure()
    axes = figure.add_subplot()
    for (start, end, name), color in zip(phase_spans, PHASE_COLORS):
        axes.axvspan(start, end, color=color, alpha=0.8, label=name)
    if train:
        style = {"marker": "o", "markersize": 3} if len(train) <= 40 else {}
        axes.plot(*zip(*_finite(train)), color="#7f8c99", linewidth=0.8, label=text["loss_step"], **style)
    if epoch_means:
        axes.plot(*zip(*epoch_means), color="#1f4e79", marker="o", markersize=3, label=text["loss_epoch"])
    if validation:
        axes.plot(
            *zip(*_finite(validation)), color="#c0392b", marker="s", markersize=3, label=text["val_loss"]
        )
    if best_validation is not None:
        axes.plot(
            *best_validation,
            marker="*",
            markersize=12,
            color="#c0392b",
            linestyle="none",
            label=text["best_val"],
        )
    if nonfinite_x is not None:
        axes.axvline(
            nonfinite_x, color="#8e44ad", linestyle="--", label=text["nonfinite"].format(step=nonfinite_step)
        )
    values = [y for _, y in train + epoch_means + validation if math.isfinite(y) and y > 0]
    log = bool(values) and max(values) / min(values) > LOG_SCALE_SPAN
    if log:
        axes.set_yscale("log")
    _x_limits(axes, train, validation, epoch_means)
    axes.set_xlabel(text[unit])
    axes.set_ylabel(text["loss"] + (text["log_scale"] if log else ""))
    axes.set_title(text["loss_title"].format(run=run_name))
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    _save(figure, path)


def plot_grad_norm_and_lr(
    path: Path,
    *,
    run_name: str,
    unit: str,
    grad_norms: XY,
    learning_rates: XY,
    nonfinite_x: float | None,
    nonfinite_step: int | None,
    language: str,
) -> None:
    """Grad norm on the left axis and learning rate on the right; only the ones logged get an axis."""
    text = LABELS[language]
    figure = _new_figure()
    left = figure.add_subplot()
    handles = []
    lr_axes = left
    if grad_norms:
        handles += left.plot(
            *zip(*_finite(grad_norms)), color="#c0392b", linewidth=0.9, label=text["grad_norm"]
        )
        left.set_ylabel(text["grad_norm"], color="#c0392b")
        lr_axes = left.twinx() if learning_rates else left
    if learning_rates:
        handles += lr_axes.plot(
            *zip(*learning_rates), color="#2471a3", linewidth=1.5, label=text["learning_rate"]
        )
        lr_axes.set_ylabel(text["learning_rate"], color="#2471a3")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if nonfinite_x is not None:
        handles.append(
            left.axvline(
                nonfinite_x,
                color="#8e44ad",
                linestyle="--",
                label=text["nonfinite"].format(step=nonfinite_step),
            )
        )
    _x_limits(left, grad_norms, learning_rates)
    left.set_xlabel(text[unit])
    title = (
        text["grad_lr_title"]
        if grad_norms and learning_rates
        else text["grad_norm" if grad_norms else "learning_rate"]
    )
    left.set_title(title.format(run=run_name) if "{run}" in title else f"{title.capitalize()}: {run_name}")
    left.legend(handles=handles, loc="upper right", fontsize=8)
    _save(figure, path)


def plot_memory(
    path: Path,
    series: dict[str, list[tuple[int, float]]],
    budget_mb: float | None,
    run_name: str,
    language: str,
) -> None:
    """Every memory/* series over optimizer steps, with the budget as a horizontal line."""
    text = LABELS[language]
    figure = _new_figure()
    axes = figure.add_subplot()
    for tag, points in series.items():
        axes.plot(*zip(*points), marker=".", label=tag.removeprefix(MEMORY_PREFIX))
    if budget_mb is not None:
        axes.axhline(budget_mb, color="#c0392b", linestyle="--", label=f"{text['budget']} {budget_mb:g} MB")
    _x_limits(axes, *series.values())
    axes.set_xlabel(text["step"])
    axes.set_ylabel(text["memory_mb"])
    axes.set_title(text["memory_title"].format(run=run_name))
    axes.legend(loc="lower right", fontsize=8)
    _save(figure, path)


def plot_answer_accuracy(
    path: Path, accuracy_pct: list[tuple[int, float]], run_name: str, language: str
) -> None:
    """Answer accuracy (%) at each evaluated epoch (epoch 0: before training)."""
    text = LABELS[language]
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.plot(*zip(*accuracy_pct), color="#1e8449", marker="o")
    axes.set_ylim(-2, 102)
    _x_limits(axes, [(float(x), y) for x, y in accuracy_pct])
    axes.set_xlabel(text["epoch"])
    axes.set_ylabel(text["accuracy"])
    axes.set_title(text["accuracy_title"].format(run=run_name))
    axes.grid(alpha=0.3)
    _save(figure, path)


def figure_inputs(
    records: Any, report: dict[str, Any], phase_names: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The data arguments of ``plot_loss`` ("loss") and ``plot_grad_norm_and_lr`` ("grad_norm_lr"): x/y in
    the unit the phases are counted in."""
    unit = report["phases"]["unit"]

    def x_of(point) -> float:
        return float(point.step) if unit == "step" else float(point.epoch)

    train = [(x_of(p), p.value) for p in records.train_losses]
    epoch_means: XY = []
    one_point_per_epoch = unit == "epoch" and report["source_kind"] != "phi2tutor-run"
    if report["loss"]["epoch_means"] and not one_point_per_epoch:
        from phi2tutor.report.records import epoch_index

        for entry in report["loss"]["epoch_means"]:
            xs = [x_of(p) for p in records.train_losses if epoch_index(p.epoch) == entry["epoch"]]
            # Drawn where the epoch's points lie (their mean x), not at the epoch's end.
            x = sum(xs) / len(xs) if xs else float(entry["epoch"]) - 0.5
            epoch_means.append((x, entry["loss"]))
    if not train and report["loss"]["epoch_means"]:
        epoch_means = [(float(e["epoch"]), e["loss"]) for e in report["loss"]["epoch_means"]]
    validation = [(x_of(p), p.value) for p in records.val_losses]
    spans = []
    phases = report["phases"]
    if phases["phases"]:
        start = 0.0 if unit == "epoch" else float(phases["first_position"])
        for phase in phases["phases"]:
            end = float(phase["last"])
            spans.append(
                (start if unit == "step" else float(phase["first"]) - 1, end, phase_names[phase["name"]])
            )
            start = end
    nonfinite = report["nonfinite"]
    nonfinite_x = None
    if nonfinite:
        nonfinite_x = float(nonfinite["first_step"]) if unit == "step" else float(nonfinite["first_epoch"])
    val = (report["validation"] or {}).get("val_loss") or {}
    best = None
    if val.get("best") is not None and len(validation) > 1:
        best = (float(val["best_step"]) if unit == "step" else float(val["best_epoch"]), val["best"])
    shared = {
        "unit": unit,
        "nonfinite_x": nonfinite_x,
        "nonfinite_step": nonfinite["first_step"] if nonfinite else None,
    }
    return {
        "loss": {
            **shared,
            "train": train,
            "epoch_means": epoch_means,
            "validation": validation,
            "phase_spans": spans,
            "best_validation": best,
        },
        "grad_norm_lr": {
            **shared,
            "grad_norms": [(x_of(p), p.value) for p in records.grad_norms],
            "learning_rates": [(x_of(p), p.value) for p in records.learning_rates if math.isfinite(p.value)],
        },
    }
