"""Every YAML in configs/ parses and instantiates through the real CLI; hub models and data sets
are replaced by the tiny Phi and the bundled problems (nothing can be downloaded here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from phi2tutor.cli import build_cli_class
from phi2tutor.data import MathDataModule
from phi2tutor.model import TutorModule
from tests.conftest import REPO, TINY_PHI

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def offline_overrides(config: dict) -> list[str]:
    overrides = ["--trainer.accelerator=cpu", "--trainer.logger=false"]
    model = config.get("model", {})
    path = model.get("model_name_or_path")
    if model.get("model_config") is None and path and not Path(path).is_dir():
        overrides.append(f"--model.model_config={yaml.safe_dump(TINY_PHI, default_flow_style=True).strip()}")
    if config.get("data", {}).get("source", "hub") == "hub":
        overrides += [
            "--data.source=synthetic",
            "--data.synthetic.train_size=16",
            "--data.synthetic.val_size=4",
        ]
    return overrides


def test_there_are_configs() -> None:
    names = {path.name for path in CONFIGS}
    assert {"demo.yaml", "phi2-qlora-4gb.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_instantiates_through_the_cli(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    cli = build_cli_class()(
        TutorModule, MathDataModule, run=False, args=["--config", str(path), *offline_overrides(config)]
    )
    assert isinstance(cli.model, TutorModule) and isinstance(cli.datamodule, MathDataModule)
    # The model section builds for real: quantization, compute dtype, LoRA, checkpointing.
    cli.model.configure_model()
    for name, parameter in cli.model.model.named_parameters():
        if parameter.requires_grad:
            assert parameter.dtype == torch.float32, name
    if config["model"].get("quantization", "none").startswith("nf4"):
        assert any(p.dtype == torch.uint8 for p in cli.model.model.parameters())
    assert cli.datamodule.hparams.prompt_template == cli.model.hparams.prompt_template
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    # 16-mixed on a GPU is fp16 autocast; the CPU's autocast does fp16 too.
    with torch.autocast("cpu", dtype=torch.float16, enabled=cli.model.hparams.compute_dtype == "float16"):
        loss = cli.model.target_token_loss(batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_checkpoints_every_n_steps_and_at_epoch_ends_into_one_last_ckpt(path: Path) -> None:
    """A long run must lose little to a crash and resume with --ckpt_path last: a ModelCheckpoint every N
    optimizer steps and one at epoch ends (after validation), both writing the one last.ckpt."""
    callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
    checkpoints = [c.get("init_args") or {} for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    stepwise = [c for c in checkpoints if c.get("every_n_train_steps")]
    at_epoch_end = [c for c in checkpoints if not c.get("every_n_train_steps")]
    assert stepwise and at_epoch_end, path.name
    for checkpoint in checkpoints:
        # A version counter would write last-v1.ckpt beside last.ckpt: two "last" files.
        assert checkpoint.get("save_last") is True and checkpoint.get("enable_version_counter") is False
