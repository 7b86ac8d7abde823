"""Small trained tutors for the tests: the demo's base (tiny-phi-arith) LoRA-tuned with trainable embeddings
and lm_head through the real `phi2tutor fit` (seconds): one for the chat, serve and export tests, one trained
on calculator annotations for the calculator-decoding tests."""

from __future__ import annotations

from pathlib import Path

from phi2tutor.cli import main
from tests.conftest import REPO, tiny_config, write_yaml

DEMO_BASE = str(REPO / "phi2tutor" / "assets" / "tiny-phi-arith")
# Held-out problems in the demo's style (the generator's test split is never trained on).
HELD_OUT = [
    "Ana has 7 apples and buys 5 more. How many apples does she have now?",
    "Tom had 9 marbles and gave 4 to his sister. How many marbles does Tom have left?",
    "A box holds 3 pens. How many pens are in 4 boxes?",
    "Lucía tiene 8 lápices y compra 6 más. ¿Cuántos lápices tiene ahora?",
]


def tutor_model_section(**options) -> dict:
    """The demo's recipe on the demo base (LoRA r 8 with trainable embeddings and lm_head), with ``options``."""
    return {
        "model_config": None,
        "model_name_or_path": DEMO_BASE,
        "lora_r": 8,
        "lora_alpha": 16,
        "modules_to_save": ["embed_tokens", "lm_head"],
        **options,
    }


def train_tiny_tutor(tmp_path: Path) -> Path:
    """Fit the tutor; returns its run directory (lightning_logs/version_0, with adapter/ and config.yaml)."""
    config = tiny_config(
        tmp_path,
        trainer={"max_epochs": 2, "enable_checkpointing": False},
        model=tutor_model_section(
            learning_rate=0.002,
            max_new_tokens=40,
            adapter_output_dir=str(tmp_path / "models" / "tiny-tutor"),
        ),
        data={
            "source": "synthetic",
            "synthetic": {"train_size": 320, "val_size": 16, "test_size": 16, "max_operand": 10, "seed": 0},
            "batch_size": 16,
            "max_length": 96,
        },
    )
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.report.TrainingReport", "init_args": {"figures": False}},
    ]
    main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])
    return sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]


def train_annotated_tutor(tmp_path: Path) -> Path:
    """Fit a tutor on calculator-annotated problems ("7 + 5 = <<7+5=12>>12"), with MathAnswerEval and
    TrainingReport; returns its run directory. 60 steps at lr 6e-3 are enough for it to write "<<7+5=" itself,
    while its own results inside the annotations are still mostly wrong: what the calculator is for."""
    config = tiny_config(
        tmp_path,
        trainer={"max_epochs": 3, "enable_checkpointing": False},
        model=tutor_model_section(learning_rate=0.006, max_new_tokens=48),
        data={
            "source": "synthetic",
            "keep_calculator_annotations": True,
            "synthetic": {
                "train_size": 320,
                "val_size": 16,
                "test_size": 16,
                "max_operand": 10,
                "two_step_share": 0.3,
                "seed": 0,
            },
            "batch_size": 16,
            "max_length": 128,
        },
    )
    config["trainer"]["callbacks"] = [
        {
            "class_path": "callbacks.math_eval.MathAnswerEval",
            "init_args": {"num_problems": 8, "max_new_tokens": 48, "every_n_epochs": 0},
        },
        {"class_path": "callbacks.report.TrainingReport", "init_args": {"figures": False}},
    ]
    main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])
    return sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]
