"""Smoke test of benchmarks/eval_throughput.py's comparison on a tiny model: both sides answer every
problem and the speedup is a positive number. The timings themselves are the benchmark's business."""

from __future__ import annotations

import importlib.util
import math
import sys

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
