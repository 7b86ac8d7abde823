"""The ``phi2tutor`` command: LightningCLI's fit/validate/test/predict over TutorModule and
MathDataModule, plus the analysis commands score, report and plan, which need no Trainer.
"""

from __future__ import annotations

import sys

EXTRA_COMMANDS = {
    "score": "Grade a predictions file (.jsonl) from any system: accuracy, correct, wrong, invalid.",
    "report": "Write the training report of a finished run (run directory or HF trainer_state.json).",
    "plan": "Estimate the peak GPU memory of a config before loading anything; does it fit the budget?",
    "chat": "Ask a trained tutor questions in the terminal (streamed answers), or --question / stdin for scripts.",
    "serve": "Serve a trained tutor over an OpenAI-compatible HTTP API (LitServe): /v1/chat/completions ...",
    "export": "Merge a trained tutor's LoRA into its base: a transformers model directory, or GGUF for llama.cpp.",
    "data": "Audit a config's data as fit reads it: duplicates, train/test overlap, lengths, difficulty.",
}

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
    if tokenizer_name_or_path:
        return tokenizer_name_or_path
    if model_config is not None:
        from phi2tutor.loading import bundled_tokenizer_dir

        return str(bundled_tokenizer_dir())
    return model_name_or_path


def build_cli_class():
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class SaveFitConfig(SaveConfigCallback):
        """Saves the config of a training run into its run directory; evaluation commands write nothing
        (with ``--trainer.logger false`` they would otherwise drop config.yaml in the working directory)."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            if stage == "fit":
                super().setup(trainer, pl_module, stage)

    class TutorCLI(LightningCLI):
        """LightningCLI with the data and model options that must agree linked together."""

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
            if self.config.get("subcommand") == "fit":
                # Before LightningCLI reads the checkpoint's hyperparameters over the given model options.
                from phi2tutor.resume import resolve_fit_resume

                resolve_fit_resume(self.config["fit"])

    TutorCLI.save_fit_config_class = SaveFitConfig
    return TutorCLI


def run_lightning_cli(args: list[str] | None) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from callbacks.dashboard import TensorBoardDashboard
    from callbacks.predictions import PredictionWriter
    from phi2tutor.data import MathDataModule
    from phi2tutor.model import TutorModule

    cli_class = build_cli_class()
    cli_class(
        TutorModule,
        MathDataModule,
        args=args,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
            },
            # Always on: the lr curve is part of every report, predict always writes its file, TensorBoard
            # shows phi2tutor's dashboard.
            "callbacks": [
                LearningRateMonitor(logging_interval="step"),
                PredictionWriter(),
                TensorBoardDashboard(),
            ],
        },
        parser_kwargs={"description": DESCRIPTION},
        save_config_callback=cli_class.save_fit_config_class,
        save_config_kwargs={"overwrite": True},
    )


def run_extra_command(name: str, args: list[str]) -> None:
    if name == "score":
        from phi2tutor.grading import main_score

        main_score(args)
    elif name == "report":
        from phi2tutor.report import main_report

        main_report(args)
    elif name == "plan":
        from phi2tutor.memory import main_plan

        main_plan(args)
    elif name == "chat":
        from phi2tutor.chat import main_chat

        main_chat(args)
    elif name == "serve":
        from phi2tutor.serve import main_serve

        main_serve(args)
    elif name == "export":
        from phi2tutor.export import main_export

        main_export(args)
    elif name == "data":
        main_data(args)


def instantiate_from_args(args: list[str]):
    """The model, data module and trainer of a config, built by the same LightningCLI parser as fit (its
    defaults, overrides, linked arguments and validation), without running anything."""
    from callbacks.predictions import PredictionWriter
    from phi2tutor.data import MathDataModule
    from phi2tutor.model import TutorModule

    cli_class = build_cli_class()
    return cli_class(
        TutorModule,
        MathDataModule,
        args=args,
        run=False,
        trainer_defaults={"logger": False, "callbacks": [PredictionWriter()]},
        save_config_callback=None,
    )


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
    options, rest = parser.parse_known_args(args)
    cli = instantiate_from_args(rest)
    config_paths = [str(p) for p in (cli.config.get("config") or [])]
    name = Path(config_paths[-1]).stem if config_paths else "default"
    output = Path(options.output or Path(cli.trainer.default_root_dir) / "lightning_logs" / f"data-{name}")
    report = cli.datamodule.write_data_report(output, options.language)
    print(report.read_text(), end="")
    print(
        f"\nphi2tutor data: wrote {report}, {report.with_suffix('.json')} and {output / 'data_lengths.png'}"
    )


def main(argv: list[str] | None = None) -> None:
    from phi2tutor.errors import Phi2TutorError, explanation

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
    except Phi2TutorError as error:
        print(f"phi2tutor: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        # A failure a callback explained (out of memory): its explanation, not a traceback; not bad input.
        text = explanation(error)
        if text is None:
            raise
        print(f"phi2tutor: error: {text}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
