"""Smoke tests of the benchmarks: eval_throughput.py's comparison on a tiny model (both sides answer every
problem, the speedup is a positive number) and with the calculator on a tutor trained with annotations (it
fires, both sides' texts agree), memory_phi2_cpu.py at a reduced width (its tables and RESULT
line, the planner within 10%), gpu_check.sh without CUDA. The timings are the benchmarks' business."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys

import pytest
import torch

from tests.conftest import REPO


def load_eval_throughput():
    spec = importlib.util.spec_from_file_location(
        "eval_throughput", REPO / "benchmarks" / "eval_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_eval_throughput_comparison_runs_both_sides_on_four_problems() -> None:
    eval_throughput = load_eval_throughput()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark does: two threads on a busy 2-core CPU crawl
    try:
        tutor = eval_throughput.load_tutor(model_dir=None)
        questions = eval_throughput.held_out_questions(4)
        comparison = eval_throughput.compare_generation(
            tutor, questions, max_new_tokens=6, batch_size=4, rounds=1
        )
    finally:
        torch.set_num_threads(threads)
    assert len(comparison.batched_answers) == len(comparison.single_answers) == len(questions)
    assert isinstance(comparison.speedup, float)
    assert comparison.speedup > 0 and math.isfinite(comparison.speedup)
    assert 0.0 <= comparison.answer_agreement <= 1.0


def test_eval_throughput_with_the_calculator_on_a_tutor_trained_with_annotations(annotated_tutor_run) -> None:
    """The calculator side: both sides decode with the calculator, it fires, and their texts agree."""
    from phi2tutor.calculator import calculate
    from phi2tutor.tutor import load_tutor
    from tests.test_calculator_decoding import ANNOTATION, held_out_one_step

    eval_throughput = load_eval_throughput()
    tutor = load_tutor(annotated_tutor_run, device="cpu")
    questions = [problem["question"] for problem in held_out_one_step(4)]
    comparison = eval_throughput.compare_generation(
        tutor, questions, max_new_tokens=32, batch_size=4, rounds=1, calculator=True
    )
    annotations = [m for answer in comparison.batched_answers for m in ANNOTATION.finditer(answer)]
    assert comparison.calculator_calls == len(annotations) >= len(questions)
    assert all(calculate(m[1]) == m[2] for m in annotations)
    assert comparison.batched_answers == comparison.single_answers
    assert 0 < comparison.speedup and comparison.answer_agreement == 1.0
    share = eval_throughput.calculator_time_share(tutor, questions, 32, 4, rounds=1)
    assert 0 < share < 100
    # The problems of the measured side: calculator_gain.py's held-out, annotated, up-to-999 problems.
    hard = eval_throughput.hard_annotated_questions(40)
    assert len(hard) == 40 and any(max(map(int, re.findall(r"\d+", q))) > 100 for q in hard)


def test_cpu_memory_benchmark_tables_and_result_at_a_reduced_width() -> None:
    """benchmarks/memory_phi2_cpu.py's own code at hidden 320: each planner phase and group has a planner and
    a measured figure, the 2-layer extrapolation and the RESULT line parse, and the planner agrees."""
    import subprocess

    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memory_phi2_cpu.py"), "--reduced", "--layers", "1", "2",
         "--max_length", "128"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    number = r"(\d+\.\d)"
    phases = ("loss forward", "loss backward", "backward of the last decoder layer",
              "backward of the first decoder layer", "optimizer step")  # fmt: skip
    for phase in phases:
        rows = [
            line for line in lines if re.match(rf"{phase} \(measured: .*\)\s+{number}\s+{number}\s+", line)
        ]
        assert len(rows) == 2, phase  # one table per run (1 and 2 layers)
    groups = [re.match(rf"  (\S.*?)\s+{number}\s+{number}\s+(\d\.\d+|-)$", line) for line in lines]
    named = {match.group(1): float(match.group(3)) for match in groups if match}
    # static terms are exact: the planner's bytes of the loaded model are what the model holds
    assert {"frozen weights", "trainable weights", "optimizer states", "gradients"} <= set(named)
    assert all(
        float(m.group(2)) == float(m.group(3))
        for m in groups
        if m and m.group(1) in ("frozen weights", "trainable weights")
    )
    result = re.fullmatch(
        rf"RESULT measured_peak_mb_32l={number} planner_peak_mb={number} ratio=(\d\.\d+) tokens_per_s=\d+\.\d "
        r"measured_phase=\S+",
        lines[-1],
    )
    assert result, lines[-1]
    assert 0.9 <= float(result.group(3)) <= 1.1  # the planner within 10% of the measured 32-layer peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_check_stops_at_once_without_cuda() -> None:
    import subprocess

    completed = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert completed.returncode == 3
    assert completed.stdout.startswith("GPU_CHECK status=no_cuda message=")
    assert "sees no CUDA device" in completed.stdout and "NVIDIA GPU" in completed.stdout
    assert "check=memory_phi2" not in completed.stdout  # nothing ran
