"""Answer-evaluation throughput: TutorModule.generate (batched, left-padded, KV cache) against one question at
a time through transformers' model.generate, same model, problems and greedy settings, alternated A B A B;
and the share of a finished demo run's training time that MathAnswerEval took. With --calculator_adapter, the
same comparison with the calculator on both sides (a tutor trained with calculator annotations, on the
calculator benchmark's hard annotated problems): TutorModule.generate(calculator=True) against model.generate
one question at a time with a CalculatorLogitsProcessor, and the same batched side with the calculator off.

Model: phi2tutor/assets/tiny-phi-arith (the demo base) when it exists, else a small PhiForCausalLM built from
a PhiConfig with the bundled tokenizer; both wrapped in a fresh LoRA as in training (zero effect on outputs).
Agreement: greedy decoding is deterministic, but a left-padded batch computes each row with other shapes
(padding, masked positions) than a lone question, so low-precision rounding can flip a near-tie and change
a few tokens; the share of identical texts and of identical extracted answers is printed.

RESULT batched_speedup=... eval_time_share_pct=... answer_agreement_pct=...
  batched_speedup: median over rounds of (problems/s batched) / (problems/s one at a time).
  eval_time_share_pct: 100 * sum of val/answer_eval_seconds / run.json duration_seconds (nan without a run).
With --calculator_adapter, last line:
RESULT calculator_batched_speedup=... calculator_calls_per_problem=... calculator_time_share_pct=...
       calculator_answer_agreement_pct=...
  calculator_batched_speedup: the same median ratio with the calculator on both sides (target > 5).
  calculator_calls_per_problem: annotations the calculator completed per problem on the batched side.
  calculator_time_share_pct: share of the batched side's generate time spent inside the calculator's logits
    processor (median over rounds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from phi2tutor.calculator_decoding import CalculatorLogitsProcessor, equals_token_ids  # noqa: E402
from phi2tutor.errors import Phi2TutorError  # noqa: E402
from phi2tutor.events import event_files, read_scalars  # noqa: E402
from phi2tutor.grading import extract_answer  # noqa: E402
from phi2tutor.keys import EVAL_SECONDS_KEY, RUN_JSON  # noqa: E402
from phi2tutor.model import TutorModule  # noqa: E402
from phi2tutor.prompts import format_prompt  # noqa: E402
from phi2tutor.synthetic import SyntheticSpec, generate_splits  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = REPO_ROOT / "phi2tutor" / "assets" / "tiny-phi-arith"
# The demo base's shape (scripts/build_demo_base.py defaults), used when the base is not built yet.
FALLBACK_MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 2048,
}


@dataclass
class GenerationComparison:
    """Rates of both sides per round, and how far their answers agree."""

    batched_rates: list[float]  # problems/s, one per round
    single_rates: list[float]
    batched_answers: list[str]
    single_answers: list[str]
    calculator_calls: int | None = None
    """Annotations the calculator completed in the last batched round (None: calculator off)."""

    @property
    def speedup(self) -> float:
        """Median over rounds of batched / single problems per second (rounds alternate, so load evens out)."""
        return statistics.median(b / s for b, s in zip(self.batched_rates, self.single_rates))

    @property
    def text_agreement(self) -> float:
        pairs = list(zip(self.batched_answers, self.single_answers))
        return sum(a == b for a, b in pairs) / max(len(pairs), 1)

    @property
    def answer_agreement(self) -> float:
        """Share of problems whose extracted final answers (as MathAnswerEval grades them) are equal."""
        pairs = list(zip(self.batched_answers, self.single_answers))
        return sum(extract_answer(a) == extract_answer(b) for a, b in pairs) / max(len(pairs), 1)


@dataclass
class EvalTimeShare:
    run_dir: Path | None
    eval_seconds: float
    fit_seconds: float
    evaluations: int

    @property
    def percent(self) -> float:
        return 100.0 * self.eval_seconds / self.fit_seconds if self.fit_seconds > 0 else math.nan


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model_dir", type=Path, default=DEMO_MODEL_DIR, help="base model directory, if it exists"
    )
    parser.add_argument(
        "--num_problems", type=int, default=64, help="held-out synthetic problems (val split)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument(
        "--batch_size", type=int, default=32, help="batch of side A (MathAnswerEval's default)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of A B, alternated")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on both sides. 1 by default: on a shared, busy 2-core CPU two OpenMP threads wait "
        "on each other at every op, which slows the many small ops of side B most and inflates the ratio",
    )
    parser.add_argument(
        "--run_dir",
        type=Path,
        help="finished run directory for eval_time_share_pct; default: the newest lightning_logs/version_* "
        f"(here or in the repository) with {EVAL_SECONDS_KEY} in its events",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and of a built model")
    parser.add_argument(
        "--calculator_adapter",
        type=Path,
        help="a tutor trained with calculator annotations (adapter or run directory, e.g. the adapter "
        "benchmarks/calculator_gain.py --output_dir D saves under D/lightning_logs/version_0/adapter): also "
        "measure the batched speedup with the calculator on, on that benchmark's hard annotated problems",
    )
    parser.add_argument(
        "--calculator_max_new_tokens",
        type=int,
        default=120,
        help="generation length with --calculator_adapter (the hard problems' annotated answers reach 84 tokens)",
    )
    return parser.parse_args()


def load_tutor(model_dir: Path | None, seed: int = 0) -> TutorModule:
    """The demo base (or a built small Phi) with a fresh LoRA, loaded by TutorModule as training loads it."""
    if model_dir is not None and (model_dir / "config.json").is_file():
        module = TutorModule(model_name_or_path=str(model_dir), init_seed=seed)
    else:
        config = {**FALLBACK_MODEL_CONFIG, "vocab_size": _bundled_vocab_size()}
        module = TutorModule(model_config=config, init_seed=seed)
    module.configure_model()
    module.eval()
    return module


def _bundled_vocab_size() -> int:
    from phi2tutor.loading import bundled_tokenizer_dir, load_tokenizer

    return len(load_tokenizer(str(bundled_tokenizer_dir()), "", None))


def held_out_questions(count: int, seed: int = 0) -> list[str]:
    """The synthetic data module's val split, the problems MathAnswerEval solves by default."""
    splits = generate_splits(SyntheticSpec(val_size=count, seed=seed))
    return [problem["question"] for problem in splits["val"]]


def generate_batched(
    module: TutorModule,
    questions: list[str],
    max_new_tokens: int,
    batch_size: int,
    calculator: bool = False,
) -> list[str]:
    """Side A: what MathAnswerEval calls (TutorModule.generate)."""
    return module.generate(
        questions, max_new_tokens=max_new_tokens, batch_size=batch_size, calculator=calculator
    )


@torch.no_grad()
def generate_one_at_a_time(
    module: TutorModule, questions: list[str], max_new_tokens: int, calculator: bool = False
) -> list[str]:
    """Side B: transformers' generate on each prompt alone (no padding), same greedy settings and KV cache;
    with ``calculator``, the same CalculatorLogitsProcessor TutorModule.generate gives a batch."""
    tokenizer = module.tokenizer
    equals_ids = equals_token_ids(tokenizer) if calculator else None
    answers = []
    for question in questions:
        prompt = format_prompt(module.hparams.prompt_template, question)
        encoded = tokenizer(prompt, return_tensors="pt").to(module.device)
        processors = (
            [CalculatorLogitsProcessor(tokenizer, encoded["input_ids"].shape[1], equals_ids)]
            if calculator
            else []
        )
        output = module.model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList(processors),
        )
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


def compare_generation(
    module: TutorModule,
    questions: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    rounds: int = 2,
    report: Callable[[str], None] | None = None,
    calculator: bool = False,
) -> GenerationComparison:
    """Both sides alternated (A B per round) after one untimed warm-up call each; rates in problems/s;
    with ``calculator``, both sides decode with the calculator."""
    generate_batched(module, questions[:2], max_new_tokens, batch_size, calculator)
    generate_one_at_a_time(module, questions[:1], max_new_tokens, calculator)
    batched_rates: list[float] = []
    single_rates: list[float] = []
    batched_answers: list[str] = []
    single_answers: list[str] = []
    for round_index in range(rounds):
        started = time.perf_counter()
        batched_answers = generate_batched(module, questions, max_new_tokens, batch_size, calculator)
        batched_seconds = time.perf_counter() - started
        counts = module.last_calculator_counts
        started = time.perf_counter()
        single_answers = generate_one_at_a_time(module, questions, max_new_tokens, calculator)
        single_seconds = time.perf_counter() - started
        batched_rates.append(len(questions) / batched_seconds)
        single_rates.append(len(questions) / single_seconds)
        if report is not None:
            report(
                f"  round {round_index + 1}: A batched {batched_rates[-1]:7.2f} problems/s ({batched_seconds:5.1f} s) | "
                f"B one at a time {single_rates[-1]:7.2f} problems/s ({single_seconds:5.1f} s)"
            )
    return GenerationComparison(
        batched_rates,
        single_rates,
        batched_answers,
        single_answers,
        counts.calls if counts is not None else None,
    )


def calculator_time_share(
    module: TutorModule, questions: list[str], max_new_tokens: int, batch_size: int, rounds: int
) -> float:
    """Median over rounds of the share (%) of batched generate time spent inside the calculator's logits
    processor: its per-step Python, the decodes and the forcing, timed around each call."""
    spent = [0.0]
    original = CalculatorLogitsProcessor.__call__

    def timed(self, input_ids, scores):
        started = time.perf_counter()
        try:
            return original(self, input_ids, scores)
        finally:
            spent[0] += time.perf_counter() - started

    shares = []
    CalculatorLogitsProcessor.__call__ = timed
    try:
        for _ in range(rounds):
            spent[0] = 0.0
            started = time.perf_counter()
            generate_batched(module, questions, max_new_tokens, batch_size, calculator=True)
            shares.append(100.0 * spent[0] / (time.perf_counter() - started))
    finally:
        CalculatorLogitsProcessor.__call__ = original
    return statistics.median(shares)


def hard_annotated_questions(count: int) -> list[str]:
    """The held-out test problems of benchmarks/calculator_gain.py (its defaults): what its tutor solves."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from calculator_gain import hard_problems

    return [problem["question"] for problem in hard_problems(count)]


def newest_run_with_eval(roots: list[Path]) -> Path | None:
    """The most recently written lightning_logs/version_* under ``roots`` whose events hold eval seconds."""
    candidates = {
        path.resolve() for root in roots for path in root.glob("lightning_logs/version_*") if path.is_dir()
    }
    by_age = sorted(
        candidates, key=lambda path: max((f.stat().st_mtime for f in event_files(path)), default=0)
    )
    for run_dir in reversed(by_age):
        if event_files(run_dir) and EVAL_SECONDS_KEY in read_scalars(run_dir):
            return run_dir
    return None


def eval_time_share(run_dir: Path) -> EvalTimeShare:
    """Seconds MathAnswerEval logged during fit over the training loop's duration (run.json, TrainingReport).

    TrainingReport times fit from on_train_start, so model loading and the sanity check are outside both
    numbers; an evaluate_before_training pass logs no seconds and is left out of the sum.
    """
    evaluations = read_scalars(run_dir).get(EVAL_SECONDS_KEY, [])
    run_json = run_dir / RUN_JSON
    duration = json.loads(run_json.read_text()).get("duration_seconds") if run_json.is_file() else None
    if duration is None:
        raise Phi2TutorError(
            f"{run_json} is missing or has no duration_seconds: the run did not end with the "
            "TrainingReport callback on. Run `bash scripts/demo.sh` for a complete run."
        )
    return EvalTimeShare(
        run_dir, sum(seconds for _, seconds in evaluations), float(duration), len(evaluations)
    )


def main() -> None:
    args = parse_args()
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "phi2tutor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    module = load_tutor(args.model_dir, args.seed)
    questions = held_out_questions(args.num_problems, args.seed)
    source = (
        args.model_dir
        if (args.model_dir / "config.json").is_file()
        else "small PhiConfig model (demo base not built)"
    )
    parameters = sum(p.numel() for p in module.model.parameters())
    print(
        f"model {source} ({parameters / 1e6:.2f}M parameters, {module.attention_implementation} attention) | "
        f"{len(questions)} problems | max_new_tokens {args.max_new_tokens} | A: TutorModule.generate batch "
        f"{args.batch_size} | B: model.generate one at a time | {args.rounds} rounds A B | threads {args.threads}",
        flush=True,
    )
    comparison = compare_generation(
        module,
        questions,
        args.max_new_tokens,
        args.batch_size,
        args.rounds,
        report=lambda line: print(line, flush=True),
    )
    print(
        f"A batched        problems/s median {statistics.median(comparison.batched_rates):7.2f}\n"
        f"B one at a time  problems/s median {statistics.median(comparison.single_rates):7.2f}\n"
        f"batched speedup (median of round ratios A/B): {comparison.speedup:.2f}  (target >= 5)\n"
        f"agreement: identical texts {100 * comparison.text_agreement:.1f}%, identical extracted answers "
        f"{100 * comparison.answer_agreement:.1f}% (left padding may flip a few near-ties)"
    )
    for batched, single in zip(comparison.batched_answers, comparison.single_answers):
        if batched != single:
            print(f"  first difference: A {batched[:80]!r}\n                    B {single[:80]!r}")
            break

    run_dir = args.run_dir or newest_run_with_eval([Path.cwd(), REPO_ROOT])
    share_pct = math.nan
    if run_dir is None:
        print(
            f"eval_time_share_pct=nan: no lightning_logs/version_* with {EVAL_SECONDS_KEY} here or in "
            f"{REPO_ROOT}. Get one with `bash scripts/demo.sh`, or pass --run_dir."
        )
    else:
        share = eval_time_share(run_dir)
        share_pct = share.percent
        print(
            f"run {share.run_dir}: MathAnswerEval {share.eval_seconds:.1f} s over {share.evaluations} evaluations "
            f"of {share.fit_seconds:.1f} s of fit -> eval_time_share_pct={share_pct:.1f}  (target <= 10)"
        )
    print(
        f"RESULT batched_speedup={comparison.speedup:.2f} eval_time_share_pct={share_pct:.1f} "
        f"answer_agreement_pct={100 * comparison.answer_agreement:.1f}",
        flush=True,
    )
    if args.calculator_adapter is not None:
        measure_with_calculator(args)


def measure_with_calculator(args: argparse.Namespace) -> None:
    """The comparison again with the calculator on both sides, on a tutor trained with annotations."""
    from phi2tutor.tutor import load_tutor as load_trained_tutor

    module = load_trained_tutor(args.calculator_adapter, device="cpu")
    questions = hard_annotated_questions(args.num_problems)
    max_new_tokens = args.calculator_max_new_tokens
    print(
        f"\ncalculator on: tutor {args.calculator_adapter} (its recorded calculator default: "
        f"{'on' if module.calculator_enabled else 'off'}) | {len(questions)} hard annotated problems "
        f"(benchmarks/calculator_gain.py's test split) | max_new_tokens {max_new_tokens} | A: "
        f"TutorModule.generate(calculator=True) batch {args.batch_size} | B: model.generate one at a time with "
        f"a CalculatorLogitsProcessor",
        flush=True,
    )
    comparison = compare_generation(
        module,
        questions,
        max_new_tokens,
        args.batch_size,
        args.rounds,
        report=lambda line: print(line, flush=True),
        calculator=True,
    )
    share_pct = calculator_time_share(module, questions, max_new_tokens, args.batch_size, args.rounds)
    calls = comparison.calculator_calls or 0
    print(
        f"A batched        problems/s median {statistics.median(comparison.batched_rates):7.2f}\n"
        f"B one at a time  problems/s median {statistics.median(comparison.single_rates):7.2f}\n"
        f"batched speedup with the calculator (median of round ratios A/B): {comparison.speedup:.2f}  "
        f"(target > 5)\ncalculator calls on side A: {calls} ({calls / len(questions):.2f} per problem); "
        f"time inside the calculator's logits processor: {share_pct:.1f}% of side A\n"
        f"agreement: identical texts {100 * comparison.text_agreement:.1f}%, identical extracted answers "
        f"{100 * comparison.answer_agreement:.1f}%"
    )
    print(
        f"RESULT calculator_batched_speedup={comparison.speedup:.2f} "
        f"calculator_calls_per_problem={calls / len(questions):.2f} calculator_time_share_pct={share_pct:.1f} "
        f"calculator_answer_agreement_pct={100 * comparison.answer_agreement:.1f}"
    )


if __name__ == "__main__":
    main()
