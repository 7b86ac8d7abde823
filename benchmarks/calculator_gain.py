"""What calculator-assisted decoding is worth: the bundled problems made hard on arithmetic (operands up to
999, multiplication, two-step problems, English) with GSM8K-style annotations ("347 * 58 = <<347*58=20126>>
20126"), the demo base (phi2tutor/assets/tiny-phi-arith) LoRA-tuned on them on the CPU with phi2tutor fit,
then the same saved adapter graded on the same held-out test problems with the calculator off and on.

Also, with --gsm8k_file (GSM8K's train.jsonl, never committed), what the calculator does for GSM8K: how
many answers and steps are annotated, and how many annotations phi2tutor.calculator reproduces (the value,
and the exact text GSM8K wrote).

Last line: RESULT accuracy_without=... accuracy_with=... gain_points=...
  accuracy_*: share of the test problems whose final answer is right (phi2tutor.grading), calculator off / on.
  gain_points: 100 * (accuracy_with - accuracy_without).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from phi2tutor.calculator import calculate, evaluate  # noqa: E402
from phi2tutor.grading import grade  # noqa: E402
from phi2tutor.keys import ADAPTER_DIR  # noqa: E402
from phi2tutor.synthetic import SyntheticSpec, generate_splits  # noqa: E402
from phi2tutor.tutor import load_tutor  # noqa: E402

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train_size", type=int, default=2000, help="annotated training problems")
    parser.add_argument("--test_size", type=int, default=200, help="held-out problems graded both ways")
    parser.add_argument("--max_operand", type=int, default=999)
    parser.add_argument("--two_step_share", type=float, default=0.5)
    parser.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="training epochs: 4 x 2000 problems is 500 steps, about 3 minutes on 2 cores; 3 x 1000 (188 "
        "steps) left the tutor at 0.16",
    )
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_new_tokens", type=int, default=120)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads. 1 by default: on a shared, busy 2-core CPU two threads wait on each other at "
        "every op (a training step measured 3.1 s with 2 threads, 0.83 s with 1)",
    )
    parser.add_argument("--output_dir", type=Path, help="where the run goes (default: a temporary directory)")
    parser.add_argument("--adapter", type=Path, help="grade this saved adapter instead of training one")
    parser.add_argument("--gsm8k_file", type=Path, help="GSM8K train.jsonl: annotation figures")
    return parser.parse_args(argv)


def spec(args: argparse.Namespace) -> SyntheticSpec:
    return SyntheticSpec(
        train_size=args.train_size,
        val_size=32,
        test_size=args.test_size,
        language="en",
        max_operand=args.max_operand,
        operations=("add", "sub", "mul"),
        two_step_share=args.two_step_share,
        calculator_annotations=True,
        seed=0,
    )


def hard_problems(count: int) -> list[dict[str, str]]:
    """The first ``count`` held-out test problems at this benchmark's default difficulty (the test split
    comes first from the generator's stream, so it does not depend on the other sizes)."""
    defaults = parse_args([])
    defaults.test_size, defaults.train_size = count, 0
    return generate_splits(spec(defaults))["test"]


def fit_config(args: argparse.Namespace, root: Path) -> dict:
    """configs/demo.yaml on the hard, annotated problems; MathAnswerEval grades with the calculator."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    trainer = config["trainer"]
    trainer["max_epochs"] = args.epochs
    trainer["default_root_dir"] = str(root)
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(root), "name": "lightning_logs", "default_hp_metric": False},
    }
    callbacks = []
    for callback in trainer["callbacks"]:
        name = callback["class_path"]
        if name.endswith("PlateauStopping") or name.endswith("ModelCheckpoint"):
            continue  # a fixed number of epochs; the adapter is saved when fit ends
        if name.endswith("MathAnswerEval"):
            callback["init_args"].update(
                num_problems=32, max_new_tokens=args.max_new_tokens, every_n_epochs=0
            )
            callback["init_args"]["evaluate_before_training"] = False
        callbacks.append(callback)
    trainer["callbacks"] = callbacks
    trainer["enable_checkpointing"] = False
    model = config["model"]
    # Absolute, so that the adapter's phi2tutor_adapter.json finds the base from any working directory.
    model["model_name_or_path"] = str(REPO_ROOT / model["model_name_or_path"])
    model.update(
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        learning_rate=args.learning_rate,
        lr_schedule_epochs=None,
        max_new_tokens=args.max_new_tokens,
    )
    model.pop("adapter_output_dir", None)
    data = config["data"]
    data["synthetic"] = {
        key: getattr(spec(args), key)
        for key in (
            "train_size",
            "val_size",
            "test_size",
            "language",
            "max_operand",
            "two_step_share",
            "seed",
        )
    }
    data["synthetic"]["operations"] = ["add", "sub", "mul"]
    data["keep_calculator_annotations"] = True
    data["max_length"] = 192
    return config


def train(args: argparse.Namespace, root: Path) -> Path:
    from phi2tutor.cli import main as phi2tutor_main

    config_path = root / "calculator_gain.yaml"
    config_path.write_text(yaml.safe_dump(fit_config(args, root), sort_keys=False))
    phi2tutor_main(["fit", "--config", str(config_path)])
    runs = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] / ADAPTER_DIR


def grade_both_ways(adapter: Path, problems: list[dict[str, str]], max_new_tokens: int) -> dict:
    """The saved tutor loaded as chat, serve and export load it, graded with the calculator off, then on."""
    tutor = load_tutor(adapter, {"max_new_tokens": max_new_tokens}, device="cpu")
    questions = [problem["question"] for problem in problems]
    results = {"calculator_default": tutor.calculator_enabled}
    for side, calculator in (("without", False), ("with", True)):
        started = time.perf_counter()
        outputs = tutor.generate(questions, batch_size=50, calculator=calculator)
        seconds = time.perf_counter() - started
        correct = sum(grade(out, problem["answer"]).correct for out, problem in zip(outputs, problems))
        results[side] = {
            "accuracy": correct / len(problems),
            "correct": correct,
            "seconds": seconds,
            "counts": tutor.last_calculator_counts,
            "sample": outputs[0],
            "failures": failure_kinds(outputs, problems),
        }
    return results


STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = <<(-?[\d.]+[-+*][\d.]+)=(-?[\d.]+)>>(-?[\d.]+)$")


def failure_kinds(outputs: list[str], problems: list[dict[str, str]]) -> Counter:
    """Why each wrong answer is wrong, at the first line where it leaves the reference solution: a step with
    another operation or other operands than the reference (reading the problem), an annotation whose
    expression is not the step's left side (copying), an annotation result that is not the arithmetic's
    (what the calculator fixes), a result not copied after ">>", a malformed step, or the final line."""
    kinds: Counter = Counter()
    for output, problem in zip(outputs, problems):
        if grade(output, problem["answer"]).correct:
            continue
        reference, written = problem["answer"].splitlines(), output.splitlines()
        kind = "answer of another length"
        for line, expected in zip(written, reference):
            if line == expected:
                continue
            if expected.startswith("####"):
                kind = "final line is not the last result"
                break
            step, wanted = STEP.match(line), STEP.match(expected)
            if step is None:
                kind = "malformed step"
            elif step.group(1, 2, 3) != wanted.group(1, 2, 3):
                kind = "step with another operation or operands (reading the problem)"
            elif step[4] != "".join(step.group(1, 2, 3)):
                kind = "annotation's expression is not the step's (copying)"
            elif evaluate(step[4]) != Fraction(step[5]):
                kind = "annotation's result wrong (arithmetic)"
            else:
                kind = "result not copied after >>"
            break
        kinds[kind] += 1
    return kinds


def gsm8k_figures(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    annotations = [match for row in rows for match in ANNOTATION.finditer(row["answer"])]
    annotated_rows = sum(1 for row in rows if ANNOTATION.search(row["answer"]))
    steps = sum(
        1
        for row in rows
        for line in row["answer"].splitlines()
        if line.strip() and not line.startswith("####")
    )
    annotated_steps = sum(
        1
        for row in rows
        for line in row["answer"].splitlines()
        if ANNOTATION.search(line) and not line.startswith("####")
    )
    same_value = sum(
        1 for m in annotations if evaluate(m[1]) is not None and evaluate(m[1]) == Fraction(m[2])
    )
    same_text = sum(1 for m in annotations if calculate(m[1]) == m[2])
    declined = sum(1 for m in annotations if evaluate(m[1]) is None)
    n = len(annotations)
    return (
        f"GSM8K {path}: {len(rows)} answers, {annotated_rows} ({100 * annotated_rows / len(rows):.1f}%) with "
        f"annotations; {annotated_steps} of {steps} solution lines ({100 * annotated_steps / steps:.1f}%) "
        f"annotated, {n} annotations ({n / len(rows):.2f} per answer).\n"
        f"phi2tutor.calculator on them: same value {same_value}/{n} ({100 * same_value / n:.2f}%), "
        f"same text {same_text}/{n} ({100 * same_text / n:.2f}%), declined {declined}; the texts that differ "
        "only in style (GSM8K writes some results as '4.80' or '.4', the calculator '4.8' and '0.4')."
    )


def main() -> None:
    args = parse_args()
    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    if args.gsm8k_file is not None:
        print(gsm8k_figures(args.gsm8k_file), flush=True)
    problems = generate_splits(spec(args))["test"]
    print(
        f"problems: bundled generator, English, operands up to {args.max_operand}, add/sub/mul, "
        f"{100 * args.two_step_share:.0f}% two-step, annotated; train {args.train_size}, test {len(problems)}; "
        f"e.g. {problems[0]['answer']!r}",
        flush=True,
    )
    started = time.perf_counter()
    if args.adapter is not None:
        adapter = args.adapter
        fit_seconds = 0.0
    else:
        root = args.output_dir or Path(tempfile.mkdtemp(prefix="calculator_gain_"))
        root.mkdir(parents=True, exist_ok=True)
        adapter = train(args, root)
        fit_seconds = time.perf_counter() - started
        print(
            f"fit: {fit_seconds:.0f} s, {args.epochs} epochs, LoRA r {args.lora_r}; adapter {adapter}",
            flush=True,
        )
    results = grade_both_ways(adapter, problems, args.max_new_tokens)
    print(f"the adapter's recorded calculator default: {'on' if results['calculator_default'] else 'off'}")
    for side in ("without", "with"):
        r = results[side]
        counts = r["counts"]
        detail = (
            f" | calculator calls {counts.calls}, changed the model's tokens {counts.changed}, declined "
            f"{counts.declined}"
            if counts is not None
            else ""
        )
        print(
            f"calculator {'on ' if side == 'with' else 'off'}: accuracy {r['accuracy']:.3f} "
            f"({r['correct']}/{len(problems)}), {r['seconds']:.1f} s{detail}\n  first answer: {r['sample']!r}"
        )
        for kind, count in r["failures"].most_common():
            print(f"  wrong, first off the reference at: {kind}: {count}")
    without, with_ = results["without"]["accuracy"], results["with"]["accuracy"]
    print(
        f"RESULT accuracy_without={without:.3f} accuracy_with={with_:.3f} gain_points={100 * (with_ - without):.1f}"
    )


if __name__ == "__main__":
    main()
