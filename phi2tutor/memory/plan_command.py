"""``phi2tutor plan``: the memory plan of a fit configuration, read by the same LightningCLI parser as
``phi2tutor fit`` (config files, command-line overrides, defaults, linked arguments and validation are
fit's), then planned from the instantiated module's and data module's hyperparameters.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from phi2tutor.cli import parse_fit_config
from phi2tutor.errors import Phi2TutorError
from phi2tutor.memory.planner import (
    DEFAULT_BUDGET_MB,
    MemoryEstimate,
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
        help="GPU memory budget in MB; default the GPUMemoryProfiler's budget_mb in the config, else 4096",
    )
    parser.add_argument(
        "--loss_token_fraction",
        type=float,
        default=1.0,
        help="share of the positions that are answer tokens (get logits); default 1.0, the worst case",
    )
    return parser


def plan_fit_config(fit_args: Sequence[str], loss_token_fraction: float = 1.0) -> tuple[MemoryEstimate, Any]:
    """The memory plan of the fit configuration given by ``fit_args`` and the parsed trainer config."""
    model, datamodule, trainer = parse_fit_config(fit_args)
    estimate = plan_from_hparams(
        model.hparams,
        datamodule.hparams if datamodule is not None else {},
        str(trainer.get("precision") or "32-true"),
        int(trainer.get("accumulate_grad_batches") or 1),
        loss_token_fraction=loss_token_fraction,
        source="the plan's configuration",
    )
    return estimate, trainer


def _budget_from_callbacks(trainer: dict[str, Any]) -> float | None:
    for callback in trainer.get("callbacks") or []:
        if type(callback).__name__ == "GPUMemoryProfiler":
            return float(callback.budget_mb)
    return None


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
    estimate, trainer = plan_fit_config(fit_args, args.loss_token_fraction)
    budget_mb = args.budget_mb or _budget_from_callbacks(trainer) or DEFAULT_BUDGET_MB
    max_micro_batch = max_micro_batch_that_fits(estimate.model, budget_mb, **estimate_settings(estimate))
    if args.json:
        print(json.dumps(estimate.to_dict(budget_mb, max_micro_batch), indent=2))
    else:
        print(format_breakdown_table(estimate, budget_mb))
        print(f"Largest micro-batch (data.batch_size) that fits {budget_mb:.0f} MB: {max_micro_batch}")
    return 0
