"""Shared test fixtures: a tiny Phi-2-class model config, the bundled tokenizer, a YAML writer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

# Tests run on the CPU with two cores; keep libraries quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_PHI = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
REPO = Path(__file__).resolve().parent.parent


def tiny_config(tmp_path: Path, **overrides) -> dict:
    """A complete fit config on the tiny model and a few generated problems, runnable in seconds."""
    config = {
        "seed_everything": 1,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "gradient_clip_val": 1.0,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {
                    "save_dir": str(tmp_path),
                    "name": "lightning_logs",
                    "default_hp_metric": False,
                },
            },
        },
        "model": {"model_config": dict(TINY_PHI), "lora_r": 4, "learning_rate": 0.003, "lora_dropout": 0.0},
        "data": {
            "source": "synthetic",
            "synthetic": {"train_size": 48, "val_size": 16, "test_size": 16},
            "batch_size": 8,
            "max_length": 128,
        },
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path))


@pytest.fixture(scope="session")
def tiny_tutor_run(tmp_path_factory) -> Path:
    """A trained tutor's run directory, shared by the chat, serve and export tests (tests/tutor_run.py)."""
    from tests.tutor_run import train_tiny_tutor

    return train_tiny_tutor(tmp_path_factory.mktemp("tutor"))


@pytest.fixture
def lightning_messages(caplog):
    """What Lightning prints (its logger does not propagate to the root logger caplog listens on)."""
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    lightning_logger.removeHandler(caplog.handler)
