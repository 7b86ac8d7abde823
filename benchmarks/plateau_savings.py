"""Compute saved by PlateauStopping: the demo run twice with the same seed, once with the plateau
stop and once to max_epochs, compared on epochs, wall time, final train loss and answer accuracy.

    python benchmarks/plateau_savings.py [--config configs/demo.yaml]

Last line: RESULT epochs_saved_pct=... final_loss_gap_pct=...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def without_plateau_stopping(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    callbacks = config["trainer"].get("callbacks") or []
    config["trainer"]["callbacks"] = [
        c for c in callbacks if not str(c.get("class_path", "")).endswith("PlateauStopping")
    ]
    return config


def run_fit(config: dict, workdir: Path, name: str) -> dict:
    """One `phi2tutor fit` in its own directory; returns the numbers its run directory records."""
    from phi2tutor.events import read_scalars

    directory = workdir / name
    directory.mkdir(parents=True)
    config = json.loads(json.dumps(config))
    config["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(directory), "name": "lightning_logs", "default_hp_metric": False},
    }
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["adapter_output_dir"] = None
    config_path = directory / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "phi2tutor.cli", "fit", "--config", str(config_path)],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    run_dir = next((directory / "lightning_logs").glob("version_*"))
    scalars = read_scalars(run_dir)
    epoch_losses = [value for _, value in scalars["train/loss_epoch"]]
    accuracy = [value for _, value in scalars.get("val/answer_accuracy", [])]
    return {
        "epochs": len(epoch_losses),
        "seconds": seconds,
        "final_train_loss": epoch_losses[-1],
        "final_answer_accuracy": accuracy[-1] if accuracy else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(REPO / "configs" / "demo.yaml"), help="a config with PlateauStopping"
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = yaml.safe_load(Path(args.config).read_text())
    with tempfile.TemporaryDirectory() as workdir:
        stopped = run_fit(config, Path(workdir), "plateau_stopping")
        full = run_fit(without_plateau_stopping(config), Path(workdir), "to_max_epochs")
    print(f"{'run':<18}{'epochs':>8}{'wall s':>9}{'final train loss':>18}{'answer accuracy':>17}")
    for name, result in (("plateau stopping", stopped), ("to max_epochs", full)):
        print(
            f"{name:<18}{result['epochs']:>8}{result['seconds']:>9.1f}{result['final_train_loss']:>18.4f}"
            f"{result['final_answer_accuracy']:>17.3f}"
        )
    epochs_saved = 100 * (1 - stopped["epochs"] / full["epochs"])
    loss_gap = 100 * (stopped["final_train_loss"] - full["final_train_loss"]) / full["final_train_loss"]
    time_saved = 100 * (1 - stopped["seconds"] / full["seconds"])
    print(
        f"epochs saved {epochs_saved:.1f}% | wall time saved {time_saved:.1f}% | final loss gap {loss_gap:+.2f}%"
    )
    print(
        f"RESULT epochs_saved_pct={epochs_saved:.1f} final_loss_gap_pct={loss_gap:.2f} time_saved_pct={time_saved:.1f}"
    )


if __name__ == "__main__":
    main()
