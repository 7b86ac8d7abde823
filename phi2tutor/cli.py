"""The ``phi2tutor`` command: LightningCLI's fit/validate/test/predict over TutorModule and
MathDataModule, plus the analysis commands score, report and plan, which need no Trainer.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXTRA_COMMANDS = {
    "score": "Grade a predictions file (.jsonl) from any system: accuracy, correct, wrong, invalid.",
    "report": "Write the training report of a finished run (run directory or HF trainer_state.json).",
    "plan": "Estimate the peak GPU memory of a config before loading anything; does it fit the budget?",
    "doctor": "Check this machine (GPU, torch build, bitsandbytes, bf16, free memory) against a config.",
    "chat": "Ask a trained tutor questions in the terminal (streamed answers), or --question / stdin for scripts.",
    "serve": "Serve a trained tutor over an OpenAI-compatible HTTP API (LitServe): /v1/chat/completions ...",
    "export": "Merge a trained tutor's LoRA into its base: a transformers model directory, or GGUF for llama.cpp.",
    "data": "Audit a config's data as fit reads it: duplicates, train/test overlap, lengths, difficulty.",
}
DEBUG_ENV = "PHI2TUTOR_DEBUG"
# The logger's save_dir when the user names none: it then follows trainer.default_root_dir (Lightning's rule).
DEFAULT_LOG_ROOT = "."

DESCRIPTION = """Fine-tune Phi-2 into a math tutor with LoRA/QLoRA and explain the run.

Training commands (Lightning): fit, validate, test, predict -- e.g.
  phi2tutor fit --config configs/demo.yaml
  phi2tutor validate --config configs/demo.yaml --model.adapter_path models/demo-tutor
Commands without training: {extra}
Run `phi2tutor COMMAND --help` for the options of a command.""".format(
    extra="; ".join(f"{name}: {text}" for name, text in EXTRA_COMMANDS.items())
)

TRAINING_COMMANDS = {
    "fit": "Train: the full optimization routine (LoRA/QLoRA fine-tuning).",
    "validate": "One evaluation epoch over the validation set (loss and answer accuracy).",
    "test": "One evaluation epoch over the test set.",
    "predict": "Generate answers for a questions file and write them as JSON lines.",
}
HELP_FLAGS = ("-h", "--help")


def top_level_help() -> str:
    """The ``phi2tutor --help`` text, written without building LightningCLI (which imports torch)."""
    commands = {**TRAINING_COMMANDS, **EXTRA_COMMANDS}
    listing = "\n".join(f"  {name:<10} {text}" for name, text in commands.items())
    return (
        f"usage: phi2tutor [-h] {{{','.join(commands)}}} ...\n\n"
        "Fine-tune Phi-2 into a math tutor with LoRA/QLoRA and explain the run.\n\n"
        f"commands:\n{listing}\n\n"
        "examples:\n"
        "  phi2tutor fit --config configs/demo.yaml\n"
        "  phi2tutor validate --config configs/demo.yaml --model.adapter_path models/demo-tutor\n\n"
        "Run `phi2tutor COMMAND --help` for the options of a command."
    )


def _tokenizer_source(model_name_or_path: str, tokenizer_name_or_path: str | None, model_config: dict | None):
    from phi2tutor.loading import tokenizer_source

    return tokenizer_source(tokenizer_name_or_path, model_name_or_path, model_config)


def build_cli_class():
    from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.utilities import rank_zero_info

    from callbacks.dashboard import TensorBoardDashboard
    from callbacks.micro_batch import AutoMicroBatch
    from callbacks.predictions import PredictionWriter

    class SaveFitConfig(SaveConfigCallback):
        """Saves the config of a training run into its run directory; evaluation commands write nothing,
        and neither does a run without a logger (it has no run directory: config.yaml would land in the
        working directory). What the run resolved is written as resolved: ``data.batch_size: auto`` as the
        micro-batch, the effective batch and the accumulation it trains with (AutoMicroBatch)."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            if stage != "fit":
                return
            if trainer.logger is None:
                rank_zero_info(
                    "phi2tutor | no logger (trainer.logger false): no run directory, config.yaml not saved"
                )
                return
            self._take_resolved(trainer)
            super().setup(trainer, pl_module, stage)

        def _take_resolved(self, trainer) -> None:
            data = getattr(trainer.datamodule, "hparams", {})
            for key in ("batch_size", "effective_batch_size"):
                if key in data and self.config.get(f"data.{key}", data[key]) != data[key]:
                    self.config[f"data.{key}"] = data[key]
            if self.config.get("trainer.accumulate_grad_batches") != trainer.accumulate_grad_batches:
                self.config["trainer.accumulate_grad_batches"] = trainer.accumulate_grad_batches

        def save_resolved_config(self, trainer) -> None:
            """Write config.yaml again after the numbers changed during fit (AutoMicroBatch's back-off)."""
            if not self.already_saved:
                return
            self._take_resolved(trainer)
            path = Path(trainer.log_dir) / self.config_filename  # every process asks: a broadcast under DDP
            if trainer.is_global_zero:
                self.parser.save(
                    self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile
                )

    class TutorCLI(LightningCLI):
        """LightningCLI with the data and model options that must agree linked together, and Lightning's own
        conventions for the defaults it adds: the logger writes under trainer.default_root_dir,
        LearningRateMonitor joins only when there is a logger, the PredictionWriter only when the config
        names no prediction writer of its own."""

        new_run_directory: Path | None = None  # set by before_fit: removed again if the run never starts

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments(
                ("model.model_name_or_path", "model.tokenizer_name_or_path", "model.model_config"),
                "data.tokenizer_name_or_path",
                compute_fn=_tokenizer_source,
            )
            parser.link_arguments("data.prompt_template", "model.prompt_template")
            # A tutor trained on calculator annotations decodes with the calculator (model.calculator overrides).
            from phi2tutor.calculator import annotated_data

            parser.link_arguments(
                ("data.keep_calculator_annotations", "data.source", "data.synthetic"),
                "model.annotated_training_data",
                compute_fn=annotated_data,
            )

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            # Before a checkpoint is looked for: `--ckpt_path last` searches the run directory it writes to.
            self._follow_default_root_dir()
            subcommand = self.config.get("subcommand")
            # Before LightningCLI reads the checkpoint's hyperparameters over the given model options.
            if subcommand == "fit":
                from phi2tutor.resume import resolve_fit_resume

                resolve_fit_resume(self.config["fit"])
            elif subcommand is not None:
                from phi2tutor.resume import resolve_checkpoint_path

                resolve_checkpoint_path(self.config[subcommand], subcommand)

        def _follow_default_root_dir(self) -> None:
            """The logger's save_dir follows trainer.default_root_dir unless it is set itself."""
            subcommand = self.config.get("subcommand")
            config = self.config.get(str(subcommand), self.config) if subcommand else self.config
            trainer = config.get("trainer")
            logger = trainer.get("logger") if trainer is not None else None
            init_args = getattr(logger, "init_args", None)
            root = trainer.get("default_root_dir") if trainer is not None else None
            if root is not None and init_args is not None and init_args.get("save_dir") == DEFAULT_LOG_ROOT:
                init_args.save_dir = root

        def instantiate_trainer(self, **kwargs):
            trainer_config = self._get(self.config_init, "trainer", default={})
            configured = trainer_config.get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            added = []
            if trainer_config.get("logger") not in (None, False, []):
                # The lr curve is part of every report; without a logger there is nothing to log it to.
                added.append(LearningRateMonitor(logging_interval="step"))
                # phi2tutor's TensorBoard dashboard (it does nothing without a TensorBoard logger).
                added.append(TensorBoardDashboard())
            if not any(isinstance(callback, BasePredictionWriter) for callback in configured):
                added.append(PredictionWriter())
            if not any(isinstance(callback, AutoMicroBatch) for callback in configured):
                # data.batch_size: auto and data.effective_batch_size (it does nothing without them).
                added.append(AutoMicroBatch())
            return super().instantiate_trainer(callbacks=[*configured, *added], **kwargs)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the checkpoint's hyperparameters here first: a damaged or foreign file must
            # stop with one message before torch's or Lightning's tracebacks.
            config = (
                self.config.get(str(self.config.get("subcommand")), {})
                if self.config.get("subcommand")
                else {}
            )
            ckpt_path = config.get("ckpt_path") if config else None
            if ckpt_path and Path(ckpt_path).is_file():
                from phi2tutor.loading import check_checkpoint

                check_checkpoint(ckpt_path)
            from phi2tutor import resume

            subcommand = str(self.config.get("subcommand"))
            given = resume.plain_options(config.get("model")) if ckpt_path and config else None
            super()._parse_ckpt_path()
            if isinstance(given, dict) and self.config[subcommand].get("model") is not None:
                from lightning.pytorch.utilities import rank_zero_info

                model = self.config[subcommand]["model"]
                for line in resume.reconcile_checkpoint_model_options(given, model, subcommand):
                    rank_zero_info(f"phi2tutor | checkpoint options: {line}")

        def _remember_new_run_directory(self) -> None:
            logger = self.trainer.logger
            log_dir = getattr(logger, "log_dir", None) if logger is not None else None
            if log_dir is not None and self.trainer.is_global_zero and not Path(log_dir).exists():
                TutorCLI.new_run_directory = Path(log_dir)

        before_fit = before_validate = before_test = before_predict = _remember_new_run_directory

    TutorCLI.save_fit_config_class = SaveFitConfig
    return TutorCLI


def run_lightning_cli(args: list[str] | None) -> None:
    from phi2tutor.data import MathDataModule
    from phi2tutor.model import TutorModule

    cli_class = build_cli_class()
    try:
        cli_class(
            TutorModule,
            MathDataModule,
            args=args,
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {
                        "save_dir": DEFAULT_LOG_ROOT,
                        "name": "lightning_logs",
                        "default_hp_metric": False,
                    },
                },
            },
            parser_kwargs={"description": DESCRIPTION},
            save_config_callback=cli_class.save_fit_config_class,
            save_config_kwargs={"overwrite": True},
        )
    except BaseException:
        _remove_unstarted_run(cli_class.new_run_directory)
        raise


def _remove_unstarted_run(run_directory: Path | None) -> None:
    """Remove the version_N/ that a failed command created before it logged anything: it holds no more than
    an empty event file, the config and the data audit fit writes at setup (``phi2tutor data`` writes it
    again), and a user would have to clean it up by hand. A directory with a checkpoint, or one that existed
    before the run (a resumed run), is never touched."""
    if run_directory is None or not run_directory.is_dir():
        return
    from phi2tutor.data_audit import DATA_REPORT_JSON, DATA_REPORT_MD, LENGTHS_PNG
    from phi2tutor.keys import CONFIG_YAML

    rewritten = (CONFIG_YAML, "hparams.yaml", DATA_REPORT_MD, DATA_REPORT_JSON, LENGTHS_PNG)
    leftovers = [path for path in run_directory.rglob("*") if path.is_file()]
    disposable = all(
        path.name.startswith("events.out.tfevents.") or path.name in rewritten for path in leftovers
    )
    if disposable and not _has_results(run_directory):
        shutil.rmtree(run_directory, ignore_errors=True)


def _has_results(run_directory: Path) -> bool:
    """Whether the run logged any result (a loss, an accuracy); the truncation count logged in setup is none."""
    try:
        from phi2tutor.events import read_scalars
        from phi2tutor.keys import TRUNCATED_KEY

        return bool(set(read_scalars(run_directory)) - {TRUNCATED_KEY})
    except Exception:  # unreadable events: keep the directory rather than guess
        return True


# Each extra command's entry point, imported only when that command runs (fast --help, no torch for score).
EXTRA_COMMAND_ENTRY_POINTS = {
    "score": ("phi2tutor.grading", "main_score"),
    "report": ("phi2tutor.report", "main_report"),
    "plan": ("phi2tutor.memory", "main_plan"),
    "chat": ("phi2tutor.chat", "main_chat"),
    "serve": ("phi2tutor.serve", "main_serve"),
    "export": ("phi2tutor.export", "main_export"),
    "data": ("phi2tutor.cli", "main_data"),
    "doctor": ("phi2tutor.doctor", "main_doctor"),
}


def run_extra_command(name: str, args: list[str]) -> None:
    import importlib

    module_name, function_name = EXTRA_COMMAND_ENTRY_POINTS[name]
    getattr(importlib.import_module(module_name), function_name)(args)


def parse_fit_config(fit_args: Sequence[str]) -> tuple[Any, Any, dict[str, Any]]:
    """(TutorModule, MathDataModule, trainer config) exactly as ``phi2tutor fit`` would build them.

    LightningCLI with run=False parses and validates the arguments and instantiates the module, the
    data module and the callbacks; neither loads weights or data before fit. The Trainer itself is not
    built (a config made for a GPU must plan on a machine without one): its parsed settings are returned.
    """
    from phi2tutor.data import MathDataModule
    from phi2tutor.model import TutorModule

    base = build_cli_class()  # fit's parser: its linked arguments included

    class PlanCLI(base):
        def instantiate_classes(self) -> None:
            self.config_init = self.parser.instantiate_classes(self.config)
            self.datamodule = self._get(self.config_init, "data")
            self.model = self._get(self.config_init, "model")

    with warnings.catch_warnings():
        # "not recommended to provide both args and command line arguments": sys.argv holds `plan`'s own.
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = PlanCLI(
            TutorModule,
            MathDataModule,
            args=list(fit_args),
            run=False,
            parser_kwargs={"description": DESCRIPTION},
        )
    trainer = cli.config_init.get("trainer")
    return cli.model, cli.datamodule, dict(trainer) if trainer is not None else {}


def main_data(args: list[str]) -> None:
    """``phi2tutor data``: the data report of a config, written without training."""
    import argparse
    from pathlib import Path

    from phi2tutor.data_audit import LANGUAGES

    parser = argparse.ArgumentParser(
        prog="phi2tutor data",
        description=(
            "Read a config's data exactly as `phi2tutor fit` would (source, fields, template, tokenizer, "
            "max_length) and write data_report.md, data_report.json and data_lengths.png: rows per split, "
            "rows skipped and why, exact and near-duplicate questions, train/test contamination by shared "
            "13-grams, token lengths against max_length, solution steps and number sizes, calculator "
            "annotations, and recommendations. Every option of `phi2tutor fit` is accepted (--config, "
            "--data.train_path, --data.max_length, ...); fit writes the same report into its run directory."
        ),
    )
    parser.add_argument(
        "--output", help="Directory for the report (default: lightning_logs/data-CONFIG_NAME)."
    )
    parser.add_argument("--language", choices=LANGUAGES, default="en", help="Report language.")
    parser.add_argument("--config", action="append", default=[], help=argparse.SUPPRESS)
    options, rest = parser.parse_known_args(args)
    # --config is read here only for the report's folder name; fit's parser reads it as fit does.
    _, datamodule, trainer = parse_fit_config([*(f"--config={path}" for path in options.config), *rest])
    name = Path(options.config[-1]).stem if options.config else "default"
    root = Path(trainer.get("default_root_dir") or ".")
    output = Path(options.output or root / "lightning_logs" / f"data-{name}")
    report = datamodule.write_data_report(output, options.language)
    print(report.read_text(), end="")
    print(
        f"\nphi2tutor data: wrote {report}, {report.with_suffix('.json')} and {output / 'data_lengths.png'}"
    )


def user_error(error: BaseException) -> BaseException | None:
    """The user-input error behind ``error``, if any: a Phi2TutorError anywhere in its chain of causes
    (jsonargparse wraps a callback's constructor error in a "Does not validate against any of the Union
    subtypes" ValueError), or a file system refusal (read-only or full disk) on a named path."""
    from phi2tutor.errors import Phi2TutorError

    seen: set[int] = set()
    pending = [error]
    filesystem_error = None
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Phi2TutorError) or _is_lightning_misconfiguration(current):
            return current
        if filesystem_error is None and isinstance(current, OSError) and current.errno in _REFUSALS:
            filesystem_error = current
        pending += [current.__cause__, current.__context__]
    return filesystem_error


def _is_lightning_misconfiguration(error: BaseException) -> bool:
    """Lightning's MisconfigurationException: a Trainer option it rejects (checked by name, so that the
    text-only commands do not import Lightning to classify an error)."""
    return any(
        cls.__name__ == "MisconfigurationException" and cls.__module__.startswith("lightning")
        for cls in type(error).__mro__
    )


_REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def describe(error: BaseException) -> str:
    """The one paragraph printed for a user error."""
    if isinstance(error, OSError):
        where = error.filename or "a file of the run"
        if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
            what = "the disk is full"
        elif error.errno == errno.EROFS:
            what = "the file system is read-only"
        elif error.errno == errno.ENOTDIR:
            what = "a part of that path is a file, not a directory"
        else:
            what = "permission denied"
        return (
            f"Cannot write {where}: {what}. A run writes its logs, checkpoints and adapter under "
            "trainer.default_root_dir (default the working directory), or where the config says (the "
            "logger's save_dir, a ModelCheckpoint's dirpath, model.adapter_output_dir): make that directory "
            "writable, or point the option at one you can write to. Files saved before this are intact."
        )
    if _is_lightning_misconfiguration(error):
        message = str(error).strip()
        if "gpu" in message.lower() or "cuda" in message.lower():
            advice = (
                "This machine offers no usable GPU to this torch build: run `phi2tutor doctor` to see why, or "
                "set trainer.accelerator to cpu (or auto)."
            )
        else:
            advice = "Fix that trainer option (`phi2tutor fit --help` lists them)."
        return f"Lightning rejects the trainer configuration: {message} {advice}"
    return str(error)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0] in HELP_FLAGS:
        # The top-level help must answer at once: LightningCLI would import torch and Lightning first.
        print(top_level_help())
        return
    try:
        if args and args[0] in EXTRA_COMMANDS:
            run_extra_command(args[0], args[1:])
        else:
            # LightningCLI reads sys.argv itself; pass args only when called from Python.
            run_lightning_cli(None if argv is None else args)
    except Exception as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        found = user_error(error)
        if found is not None:
            print(f"phi2tutor: error: {describe(found)}", file=sys.stderr)
            raise SystemExit(2) from None
        # A failure a callback explained (out of memory): its explanation, not a traceback; not bad input.
        from phi2tutor.errors import explanation

        text = explanation(error)
        if text is None:
            raise
        print(f"phi2tutor: error: {text}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
