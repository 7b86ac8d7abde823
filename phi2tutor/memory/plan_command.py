"""``phi2tutor plan``: the memory plan of a fit configuration, read by the same LightningCLI parser as
``phi2tutor fit`` (config files, command-line overrides, defaults, linked arguments and validation are
fit's), then planned from the instantiated module's and data module's hyperparameters.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from phi2tutor.cli import parse_fit_config
from phi2tutor.errors import Phi2TutorError
from phi2tutor.memory.planner import (
    AUTO_BATCH,
    MemoryEstimate,
    MicroBatchChoice,
    accumulation_for,
    auto_budget,
    choose_micro_batch,
    configured_replicas,
    effective_batch_size,
    estimate_settings,
    format_breakdown_table,
    max_micro_batch_that_fits,
    plan_from_hparams,
)

USAGE = (
    "phi2tutor plan --config CONFIG.yaml [fit's options, e.g. --data.batch_size 2] "
    "[--budget_mb MB] [--loss_token_fraction F] [--json]"
)


def _plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi2tutor plan",
        usage=USAGE,
        description="Estimate the peak GPU memory of a training config before loading any weight. Every "
        "option of `phi2tutor fit` (--config, --model.*, --data.*, --trainer.*) is read as fit reads it.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--budget_mb",
        type=float,
        default=None,
        help="GPU memory budget in MB (also what data.batch_size auto plans for); default the "
        "GPUMemoryProfiler's budget_mb in the config, else 4096",
    )
    parser.add_argument(
        "--loss_token_fraction",
        type=float,
        default=1.0,
        help="share of the positions that are answer tokens (get logits); default 1.0, the worst case",
    )
    return parser


@dataclass
class FitPlan:
    """A fit configuration's memory plan: the estimate at the micro-batch and accumulation it trains with
    (``auto``'s choice when data.batch_size is auto; the accumulation data.effective_batch_size decides when
    set), the budget, and what ``data.batch_size: auto`` picks."""

    estimate: MemoryEstimate
    trainer: dict[str, Any]
    budget_mb: float
    budget_from: str
    auto: MicroBatchChoice | None  # None: auto could not pick (auto_error says why)
    auto_error: str | None
    batch_size_is_auto: bool
    replicas_known: bool  # False: trainer.devices is auto or -1, planned for one device


def plan_fit(
    fit_args: Sequence[str], loss_token_fraction: float = 1.0, budget_mb: float | None = None
) -> FitPlan:
    """The memory plan of the fit configuration given by ``fit_args``: parsed as fit parses it, the budget
    from ``budget_mb``, else the GPUMemoryProfiler's budget_mb in the config, else the default (the rule of
    auto_budget without a device: plan never looks at this machine's GPU)."""
    model, datamodule, trainer = parse_fit_config(fit_args)
    data = dict(datamodule.hparams) if datamodule is not None else {}
    configured_accumulation = int(trainer.get("accumulate_grad_batches") or 1)
    batch_size_is_auto = data.get("batch_size") == AUTO_BATCH
    replicas = configured_replicas(trainer.get("devices"), trainer.get("num_nodes"))
    processes = replicas or 1
    accumulation = configured_accumulation
    if not batch_size_is_auto and data.get("effective_batch_size") is not None:
        try:  # as AutoMicroBatch sets it when fit starts
            accumulation = accumulation_for(
                data["effective_batch_size"], data["batch_size"], processes, "data.effective_batch_size"
            )
        except ValueError as error:
            raise Phi2TutorError(f"{str(error)[0].upper()}{str(error)[1:]}.") from None
    base = plan_from_hparams(
        model.hparams,
        {**data, "batch_size": 1} if batch_size_is_auto else data,
        str(trainer.get("precision") or "32-true"),
        accumulation,
        loss_token_fraction=loss_token_fraction,
        source="the plan's configuration",
    )
    if budget_mb is not None:
        budget, budget_from = budget_mb, "--budget_mb"
    else:
        budget, budget_from = auto_budget(_budget_from_callbacks(trainer), None)
    effective, _ = effective_batch_size(data.get("effective_batch_size"), configured_accumulation, processes)
    auto, auto_error = None, None
    try:
        auto = choose_micro_batch(base, budget, effective, processes)
    except ValueError as error:
        if batch_size_is_auto:
            raise Phi2TutorError(f"data.batch_size auto: {error}.") from None
        auto_error = str(error)
    estimate = auto.estimate if auto is not None and batch_size_is_auto else base
    return FitPlan(
        estimate,
        trainer,
        budget,
        budget_from,
        auto,
        auto_error,
        batch_size_is_auto,
        replicas is not None,
    )


def plan_fit_config(fit_args: Sequence[str], loss_token_fraction: float = 1.0) -> tuple[MemoryEstimate, Any]:
    """The memory plan of the fit configuration given by ``fit_args`` and the parsed trainer config."""
    plan = plan_fit(fit_args, loss_token_fraction)
    return plan.estimate, plan.trainer


def _budget_from_callbacks(trainer: dict[str, Any]) -> float | None:
    for callback in trainer.get("callbacks") or []:
        if type(callback).__name__ == "GPUMemoryProfiler":
            return float(callback.budget_mb)
    return None


def auto_line(plan: FitPlan) -> str:
    """What ``data.batch_size: auto`` picks (or picked, when the config says auto), in one paragraph."""
    if plan.auto is None:
        return f"data.batch_size auto could not pick a micro-batch for this config: {plan.auto_error}."
    verb = "picks" if plan.batch_size_is_auto else "would pick"
    devices = "" if plan.replicas_known else "; trainer.devices auto: planned for one device"
    return (
        f"data.batch_size auto {verb} (budget {plan.budget_mb:.0f} MB: {plan.budget_from}{devices}): "
        f"{plan.auto.describe()}"
    )


def main_plan(argv: Sequence[str] | None = None) -> int:
    """``phi2tutor plan --config cfg.yaml [fit options] [--json] [--budget_mb N]``: print the memory plan."""
    import sys

    args, fit_args = _plan_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.budget_mb is not None and not args.budget_mb > 0:
        raise Phi2TutorError(
            f"--budget_mb {args.budget_mb:g}: a memory budget must be a positive number of MB "
            "(e.g. --budget_mb 4096 for a 4 GB card)."
        )
    if not 0 < args.loss_token_fraction <= 1:
        raise Phi2TutorError(
            f"--loss_token_fraction {args.loss_token_fraction:g}: give the share of positions that are "
            "answer tokens, in (0, 1] (1.0, the default, plans the worst case)."
        )
    plan = plan_fit(fit_args, args.loss_token_fraction, args.budget_mb)
    estimate, budget_mb = plan.estimate, plan.budget_mb
    max_micro_batch = max_micro_batch_that_fits(estimate.model, budget_mb, **estimate_settings(estimate))
    if args.json:
        result = estimate.to_dict(budget_mb, max_micro_batch)
        result["budget_from"] = plan.budget_from
        auto = plan.auto.to_dict() if plan.auto is not None else {"error": plan.auto_error}
        result["auto_micro_batch"] = {"batch_size_is_auto": plan.batch_size_is_auto, **auto}
        print(json.dumps(result, indent=2))
    else:
        print(format_breakdown_table(estimate, budget_mb))
        print(f"Largest micro-batch (data.batch_size) that fits {budget_mb:.0f} MB: {max_micro_batch}")
        print(auto_line(plan))
    return 0
