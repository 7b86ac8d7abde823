"""The phase-aware learning rate against the plain schedule: the demo fitted twice with the same seed and
PlateauStopping, once as configured (PhaseAwareLR shortens the cosine when rapid learning ends) and once with
PhaseAwareLR removed (the cosine runs its whole course), compared on epochs run, final train loss and answer
accuracy (the saved adapter graded on the config's held-out test problems; the last MathAnswerEval accuracy
on the validation problems beside it).

    python benchmarks/phase_lr.py [--config configs/demo-phase-lr.yaml]

Last line: RESULT epochs_plain=... epochs_phase=... loss_gap_pct=... accuracy_gap=...
(loss_gap_pct: the phase-aware run's final train loss above the plain run's, in percent; accuracy_gap: its
test accuracy minus the plain run's, in points of 1.0). Target: fewer epochs, loss within 5%, accuracy no lower.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml
from plateau_savings import REPO, run_fit  # the same fit, in its own directory, read back from its events

from phi2tutor.events import read_texts
from phi2tutor.keys import ADAPTER_DIR, LR_SCHEDULE_TEXT_TAG

PHASE_LR = "PhaseAwareLR"


def without_phase_lr(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    callbacks = config["trainer"].get("callbacks") or []
    config["trainer"]["callbacks"] = [
        c for c in callbacks if not str(c.get("class_path", "")).endswith(PHASE_LR)
    ]
    return config


def texts_of(run_dir: Path, tag: str) -> list[str]:
    return [
        text for name, entries in read_texts(run_dir).items() if name.startswith(tag) for _, text in entries
    ]


def test_accuracy(config: dict, adapter: Path) -> tuple[float, int, int]:
    """The adapter's answer accuracy on the config's synthetic test split, decoded as `phi2tutor test` does."""
    from phi2tutor.grading import grade
    from phi2tutor.model import TutorModule
    from phi2tutor.synthetic import SyntheticSpec, generate_splits

    model = config["model"]
    tutor = TutorModule(
        model_name_or_path=str(REPO / model["model_name_or_path"]),
        adapter_path=str(adapter),
        modules_to_save=model.get("modules_to_save"),
        max_new_tokens=model.get("max_new_tokens", 256),
    )
    tutor.configure_model()
    problems = generate_splits(SyntheticSpec(**config["data"]["synthetic"]))["test"]
    outputs = tutor.generate([p["question"] for p in problems], batch_size=50)
    correct = sum(grade(output, p["answer"]).correct for output, p in zip(outputs, problems))
    return correct / len(problems), correct, len(problems)


def measure(config: dict, workdir: Path, name: str) -> dict:
    result = run_fit(config, workdir, name)
    run_dir = next((workdir / name / "lightning_logs").glob("version_*"))
    result["test_accuracy"], result["test_correct"], result["test_size"] = test_accuracy(
        config, run_dir / ADAPTER_DIR
    )
    result["phase_lr"] = texts_of(run_dir, LR_SCHEDULE_TEXT_TAG)
    result["phases"] = texts_of(run_dir, "phase/transitions")
    result["stop"] = texts_of(run_dir, "plateau/stop")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "demo-phase-lr.yaml"),
        help="a config with PhaseDetection, PhaseAwareLR and PlateauStopping, on synthetic data",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = yaml.safe_load(Path(args.config).read_text())
    if not any(
        str(c.get("class_path", "")).endswith(PHASE_LR) for c in config["trainer"].get("callbacks") or []
    ):
        parser.error(f"{args.config} has no {PHASE_LR} callback: there would be nothing to compare")
    with tempfile.TemporaryDirectory() as workdir:
        plain = measure(without_phase_lr(config), Path(workdir), "plain")
        phase = measure(config, Path(workdir), "phase_aware")
    print(
        f"{'schedule':<14}{'epochs':>8}{'wall s':>9}{'final train loss':>18}{'test accuracy':>15}{'val accuracy':>14}"
    )
    for name, result in (("plain", plain), ("phase-aware", phase)):
        print(
            f"{name:<14}{result['epochs']:>8}{result['seconds']:>9.1f}{result['final_train_loss']:>18.5f}"
            f"{result['test_accuracy']:>15.3f}{result['final_answer_accuracy']:>14.3f}"
        )
    for name, result in (("plain", plain), ("phase-aware", phase)):
        for line in [*result["phases"], *result["phase_lr"], *result["stop"]]:
            print(f"{name}: {line}")
    if not phase["phase_lr"]:
        print(
            "phase-aware: PhaseDetection reported no end of rapid learning, so the schedule was not changed"
        )
    loss_gap = 100 * (phase["final_train_loss"] - plain["final_train_loss"]) / plain["final_train_loss"]
    accuracy_gap = phase["test_accuracy"] - plain["test_accuracy"]
    met = phase["epochs"] < plain["epochs"] and loss_gap <= 5 and accuracy_gap >= 0
    print(
        f"test accuracy {phase['test_correct']}/{phase['test_size']} vs {plain['test_correct']}/{plain['test_size']}"
        f" | target (fewer epochs, loss within 5%, accuracy no lower): {'met' if met else 'not met'}"
    )
    print(
        f"RESULT epochs_plain={plain['epochs']} epochs_phase={phase['epochs']} loss_gap_pct={loss_gap:.2f} "
        f"accuracy_gap={accuracy_gap:.3f}"
    )


if __name__ == "__main__":
    main()
