"""The phase-aware learning rate against the plain schedule: the demo fitted twice with the same seed and
PlateauStopping, once as configured (PhaseAwareLR shortens the cosine when rapid learning ends) and once with
PhaseAwareLR removed (the cosine runs its whole course), compared on epochs run, final train loss, final validation
loss (held-out problems) and answer accuracy (the saved adapter graded on the config's held-out test problems;
the last MathAnswerEval accuracy on the validation problems beside it).

    python benchmarks/phase_lr.py [--config configs/demo-phase-lr.yaml] [--decay_fractions 0.5 0.7 0.85]

--decay_fractions runs the phase-aware fit once for each value of PhaseAwareLR's decay_fraction (the plain
fit runs once); without it, once as configured. One RESULT line per phase-aware fit, the configured one last:
RESULT epochs_plain=... epochs_phase=... loss_gap_pct=... val_loss_gap_pct=... accuracy_gap=...
(loss_gap_pct and val_loss_gap_pct: the phase-aware run's final train and validation loss above the plain
run's, in percent; accuracy_gap: its test accuracy minus the plain run's, in points of 1.0). Target: fewer
epochs, loss within 5%, accuracy no lower.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml
from plateau_savings import REPO, run_fit  # the same fit, in its own directory, read back from its events

from phi2tutor.events import read_scalars, read_texts
from phi2tutor.keys import ADAPTER_DIR, LR_SCHEDULE_TEXT_TAG, VAL_LOSS_KEY

PHASE_LR = "PhaseAwareLR"


def without_phase_lr(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    callbacks = config["trainer"].get("callbacks") or []
    config["trainer"]["callbacks"] = [
        c for c in callbacks if not str(c.get("class_path", "")).endswith(PHASE_LR)
    ]
    return config


def with_decay_fraction(config: dict, decay_fraction: float) -> dict:
    config = json.loads(json.dumps(config))
    for callback in config["trainer"]["callbacks"]:
        if str(callback.get("class_path", "")).endswith(PHASE_LR):
            callback["init_args"] = {"decay_fraction": decay_fraction}
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
    val_losses = read_scalars(run_dir).get(VAL_LOSS_KEY, [])
    result["final_val_loss"] = val_losses[-1][1] if val_losses else float("nan")
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
    parser.add_argument(
        "--decay_fractions",
        type=float,
        nargs="+",
        metavar="F",
        help="also fit with PhaseAwareLR(decay_fraction=F) for each F (the plain fit runs once)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = yaml.safe_load(Path(args.config).read_text())
    if not any(
        str(c.get("class_path", "")).endswith(PHASE_LR) for c in config["trainer"].get("callbacks") or []
    ):
        parser.error(f"{args.config} has no {PHASE_LR} callback: there would be nothing to compare")
    if any(not 0 < value < 1 for value in args.decay_fractions or []):
        parser.error(f"--decay_fractions {args.decay_fractions}: each must be strictly between 0 and 1")
    variants = [
        (f"decay_fraction={value:g}", with_decay_fraction(config, value))
        for value in args.decay_fractions or []
    ]
    variants.append(("as configured", config))
    with tempfile.TemporaryDirectory() as workdir:
        plain = measure(without_phase_lr(config), Path(workdir), "plain")
        phased = [
            (name, measure(variant, Path(workdir), f"phase_aware_{index}"))
            for index, (name, variant) in enumerate(variants)
        ]
    runs = [("plain", plain), *((f"phase-aware {name}", result) for name, result in phased)]
    print(
        f"{'schedule':<28}{'epochs':>7}{'wall s':>8}{'final train loss':>18}{'final val loss':>16}"
        f"{'test accuracy':>15}{'val accuracy':>14}"
    )
    for name, result in runs:
        print(
            f"{name:<28}{result['epochs']:>7}{result['seconds']:>8.1f}{result['final_train_loss']:>18.5f}"
            f"{result['final_val_loss']:>16.5f}{result['test_accuracy']:>15.3f}{result['final_answer_accuracy']:>14.3f}"
        )
    for name, result in runs:
        for line in [*result["phases"], *result["phase_lr"], *result["stop"]]:
            print(f"{name}: {line}")
        if name != "plain" and not result["phase_lr"]:
            print(
                f"{name}: PhaseDetection reported no end of rapid learning, so the schedule was not changed"
            )
    for name, phase in phased:
        loss_gap = 100 * (phase["final_train_loss"] - plain["final_train_loss"]) / plain["final_train_loss"]
        val_gap = 100 * (phase["final_val_loss"] - plain["final_val_loss"]) / plain["final_val_loss"]
        accuracy_gap = phase["test_accuracy"] - plain["test_accuracy"]
        met = phase["epochs"] < plain["epochs"] and loss_gap <= 5 and accuracy_gap >= 0
        print(
            f"{name}: test accuracy {phase['test_correct']}/{phase['test_size']} vs "
            f"{plain['test_correct']}/{plain['test_size']} | target (fewer epochs, train loss within 5%, "
            f"accuracy no lower): {'met' if met else 'not met'}"
        )
        print(
            f"RESULT epochs_plain={plain['epochs']} epochs_phase={phase['epochs']} loss_gap_pct={loss_gap:.2f} "
            f"val_loss_gap_pct={val_gap:.2f} accuracy_gap={accuracy_gap:.3f}"
        )


if __name__ == "__main__":
    main()
