"""Data-parallel training through Lightning's DDP strategy: two CPU processes (gloo) running the real
``phi2tutor`` CLI on the tiny Phi with a 4-bit base. A recording callback writes what each process saw
(example ids, losses, gradient all-reduces, stop decisions, final weights and logits) to files that the
tests compare with the single-process truth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from phi2tutor.data import LengthGroupedSampler, MathDataModule
from phi2tutor.events import read_scalars
from phi2tutor.grading import extract_answer, grade
from phi2tutor.loading import bundled_tokenizer_dir
from phi2tutor.model import TutorModule
from phi2tutor.synthetic import SyntheticSpec
from tests.conftest import REPO, TINY_PHI, tiny_config, write_yaml

WORLD_SIZE = 2
TRAIN_SIZE, VAL_SIZE, MICRO_BATCH, ACCUMULATION = 48, 16, 4, 2
BATCHES_PER_EPOCH = TRAIN_SIZE // (WORLD_SIZE * MICRO_BATCH)  # per process: 6
STEPS_PER_EPOCH = BATCHES_PER_EPOCH // ACCUMULATION  # 3
STOP_EPOCH = 2  # PlateauStopping(window=2, min_rel_improvement=0.9): the first full window stops
NUM_PROBLEMS = 5  # odd: the answer-eval shards are uneven (3 + 2)
PROBE_IDS = [[5, 17, 42, 99, 7, 3, 250, 11]]
RUN_TIMEOUT_S = 240

# Gradient all-reduces of this process, as the bucket sizes (numbers of gradient elements) DDP reduced.
ALLREDUCE_BUCKETS: list[int] = []


def counting_allreduce_hook(state, bucket):
    """DDP communication hook: torch's default all-reduce, counted. (Unannotated: DDP checks the annotations
    and this module's are strings.)"""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ALLREDUCE_BUCKETS.append(bucket.buffer().numel())
    return allreduce_hook(state, bucket)


class RecordRank(Callback):
    """Test-only: writes what this process saw to ``output_dir/rank{N}.json`` (and its weights and logits).

    Args:
        output_dir: directory for the per-process files.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.batches: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning registers DDPStrategy(ddp_comm_hook=...) on CUDA only; on the CPU register it here, after
        # DDP wrapped the module and before the first backward.
        from torch.nn.parallel import DistributedDataParallel

        assert isinstance(trainer.strategy.model, DistributedDataParallel)
        trainer.strategy.model.register_comm_hook(None, counting_allreduce_hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(
            {
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "example_ids": batch["example_ids"].tolist(),
                # The micro-batch's own token-mean loss (what train/loss logs), next to the step's objective.
                "loss": float(outputs["token_mean_loss"]),
                "global_step": trainer.global_step,
                "allreduces": len(ALLREDUCE_BUCKETS),
                "reduced_elements": sum(ALLREDUCE_BUCKETS),
            }
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from callbacks.phases import PhaseDetection

        phases = next(cb for cb in trainer.callbacks if isinstance(cb, PhaseDetection))
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "loss_epoch": float(trainer.callback_metrics["train/loss_epoch"]),
                "phase_values": phases.values,
                "phase_index": phases.current_phase_index,
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        from callbacks.math_eval import MathAnswerEval
        from callbacks.plateau import PlateauStopping

        rank = trainer.global_rank
        self.output_dir.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(trainable, self.output_dir / f"rank{rank}_trainable.pt")
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            ids = torch.tensor(PROBE_IDS)
            logits = pl_module(ids, torch.ones_like(ids)).logits
        pl_module.train(was_training)
        torch.save(logits, self.output_dir / f"rank{rank}_logits.pt")
        evaluator = next(cb for cb in trainer.callbacks if isinstance(cb, MathAnswerEval))
        # Lightning runs EarlyStopping-like callbacks after the others at epoch end: read the decision here.
        plateau = next(cb for cb in trainer.callbacks if isinstance(cb, PlateauStopping))
        record = {
            "rank": rank,
            "world_size": trainer.world_size,
            "batches": self.batches,
            "epochs": self.epochs,
            "trainable_elements": sum(t.numel() for t in trainable.values()),
            "stop": {
                "should_stop": trainer.should_stop,
                "global_step": trainer.global_step,
                "stopped_at_epoch": plateau.stopped_at_epoch,
                "reason": plateau.stopping_reason.name,
                "checked_values": plateau.checked_values,
            },
            "answer_eval": evaluator.history,
            "answer_samples": evaluator.last_samples,
            "log_dir": trainer.log_dir,
        }
        (self.output_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real ``phi2tutor`` command in a fresh process; Lightning's DDP launcher starts the second one."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "phi2tutor.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    if result.returncode != 0:
        # The first traceback of each process, not only the one that saw its peer vanish.
        errors = [line for line in result.stderr.splitlines() if line.startswith("[rank1]")][-15:]
        pytest.fail(f"phi2tutor {' '.join(args)} failed:\n{result.stderr[-4000:]}\n" + "\n".join(errors))
    return result


def ddp_trainer() -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "devices": WORLD_SIZE,
        "num_nodes": 1,
        "strategy": {
            "class_path": "lightning.pytorch.strategies.DDPStrategy",
            "init_args": {
                "process_group_backend": "gloo",
                "find_unused_parameters": False,
            },
        },
    }


def model_section(base_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "model_name_or_path": str(base_dir),
        "model_config": None,
        "tokenizer_name_or_path": str(bundled_tokenizer_dir()),
        "quantization": "nf4",
        "lora_r": 4,
        "learning_rate": 0.003,
        "lora_dropout": 0.0,
        **overrides,
    }


def save_tiny_base(directory: Path) -> Path:
    """The tiny Phi as a model directory: every process loads and quantizes it as it would Phi-2's."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    PhiForCausalLM(PhiConfig(**TINY_PHI)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict[str, Any]:
    """One 2-process fit through the CLI, shared by the tests that read what it wrote."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    base_dir = save_tiny_base(tmp_path / "tiny-phi")
    record_dir = tmp_path / "ranks"
    config = tiny_config(
        tmp_path,
        trainer={
            **ddp_trainer(),
            "max_epochs": 6,
            "accumulate_grad_batches": ACCUMULATION,
            "callbacks": [
                {"class_path": "callbacks.phases.PhaseDetection", "init_args": {"window": 2}},
                {
                    "class_path": "callbacks.plateau.PlateauStopping",
                    "init_args": {"window": 2, "min_rel_improvement": 0.9},
                },
                {
                    "class_path": "callbacks.math_eval.MathAnswerEval",
                    "init_args": {"num_problems": NUM_PROBLEMS, "max_new_tokens": 8, "num_samples_logged": 8},
                },
                {"class_path": "callbacks.memory.GPUMemoryProfiler", "init_args": {"every_n_steps": 1}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True},
                },
                {"class_path": "tests.test_ddp.RecordRank", "init_args": {"output_dir": str(record_dir)}},
            ],
        },
        model=model_section(base_dir, adapter_output_dir=str(tmp_path / "models" / "tutor")),
        data={
            "synthetic": {"train_size": TRAIN_SIZE, "val_size": VAL_SIZE, "test_size": 8},
            "batch_size": MICRO_BATCH,
        },
    )
    config_path = write_yaml(tmp_path / "ddp.yaml", config)
    result = run_cli("fit", "--config", str(config_path), cwd=tmp_path)
    ranks = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    run_dirs = sorted((tmp_path / "lightning_logs").glob("version_*"))
    return {
        "base_dir": base_dir,
        "ranks": ranks,
        "run_dirs": run_dirs,
        "record_dir": record_dir,
        "result": result,
    }


def train_lengths() -> list[int]:
    data = MathDataModule(
        source="synthetic",
        synthetic=SyntheticSpec(train_size=TRAIN_SIZE, val_size=VAL_SIZE, test_size=8),
        batch_size=MICRO_BATCH,
        max_length=128,
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
    )
    data.setup("fit")
    return [len(e.input_ids) for e in data.datasets["train"].examples]


def test_each_example_is_seen_once_per_epoch_in_length_grouped_shards(ddp_run: dict[str, Any]) -> None:
    ranks = ddp_run["ranks"]
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    lengths = train_lengths()
    for epoch in range(STOP_EPOCH):
        shards = [[i for b in r["batches"] if b["epoch"] == epoch for i in b["example_ids"]] for r in ranks]
        assert [len(s) for s in shards] == [TRAIN_SIZE // WORLD_SIZE] * WORLD_SIZE
        assert set(shards[0]).isdisjoint(shards[1])
        assert set(shards[0]) | set(shards[1]) == set(range(TRAIN_SIZE))
        # Process r takes every WORLD_SIZE-th index of the one length-grouped order, so its batches keep
        # neighbours of similar length (Lightning's own wrapper would shuffle that order again).
        sampler = LengthGroupedSampler(lengths, MICRO_BATCH, seed=42)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for rank, shard in enumerate(shards):
            assert shard == order[rank::WORLD_SIZE]
    first_epochs = [[i for b in r["batches"] if b["epoch"] == 0 for i in b["example_ids"]] for r in ranks]
    second_epochs = [[i for b in r["batches"] if b["epoch"] == 1 for i in b["example_ids"]] for r in ranks]
    assert first_epochs != second_epochs  # set_epoch reaches the inner sampler: a new order per epoch


def test_gradients_are_all_reduced_once_per_optimizer_step_and_only_for_trainable_weights(
    ddp_run: dict[str, Any],
) -> None:
    for rank in ddp_run["ranks"]:
        batches = rank["batches"]
        calls = [b["allreduces"] for b in batches]
        elements = [b["reduced_elements"] for b in batches]
        previous_calls, previous_elements = 0, 0
        for batch, count, reduced in zip(batches, calls, elements):
            steps = batch["batch_idx"] % ACCUMULATION == ACCUMULATION - 1
            if steps:
                # one optimizer step: every trainable (LoRA) element reduced once, nothing frozen
                assert count > previous_calls
                assert reduced - previous_elements == rank["trainable_elements"]
            else:
                # accumulation micro-batch: Lightning runs backward under DDP's no_sync
                assert (count, reduced) == (previous_calls, previous_elements)
            previous_calls, previous_elements = count, reduced
        assert batches[-1]["global_step"] == STOP_EPOCH * STEPS_PER_EPOCH
    # the synchronized weights are the same on every process
    weights = [torch.load(ddp_run["record_dir"] / f"rank{r}_trainable.pt") for r in range(WORLD_SIZE)]
    assert weights[0].keys() == weights[1].keys() and all("lora_" in name for name in weights[0])
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)


def test_epoch_loss_is_the_mean_over_all_processes_and_logged_once(ddp_run: dict[str, Any]) -> None:
    assert len(ddp_run["run_dirs"]) == 1  # one run directory, chosen by rank 0
    run_dir = ddp_run["run_dirs"][0]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes TensorBoard
    scalars = read_scalars(run_dir)
    logged = [value for _, value in scalars["train/loss_epoch"]]
    assert len(logged) == STOP_EPOCH
    for epoch in range(STOP_EPOCH):
        # equal micro-batches on both processes: the epoch loss is the plain mean of all their batch losses
        losses = [b["loss"] for r in ddp_run["ranks"] for b in r["batches"] if b["epoch"] == epoch]
        assert len(losses) == WORLD_SIZE * BATCHES_PER_EPOCH
        assert logged[epoch] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
        for rank in ddp_run["ranks"]:
            assert rank["epochs"][epoch]["loss_epoch"] == pytest.approx(logged[epoch], rel=1e-6)
    steps = [step for step, _ in scalars["train/loss"]]
    assert len(steps) == len(set(steps)) == STOP_EPOCH * STEPS_PER_EPOCH
    for tag in ("val/loss", "val/answer_accuracy", "phase/index"):
        points = scalars[tag]
        assert len(points) == len({step for step, _ in points}) == STOP_EPOCH, tag
    # rank 0 alone wrote memory.json, the adapter and the checkpoint
    assert (run_dir / "memory.json").is_file()
    assert json.loads((run_dir / "memory.json").read_text())["global_step"] == STOP_EPOCH * STEPS_PER_EPOCH
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    stdout = ddp_run["result"].stdout + ddp_run["result"].stderr
    expected = MICRO_BATCH * ACCUMULATION * WORLD_SIZE
    assert (
        stdout.count(f"effective batch {expected} = micro-batch {MICRO_BATCH} x accumulation {ACCUMULATION}")
        == 1
    )


def test_plateau_stop_and_phases_agree_on_every_process(ddp_run: dict[str, Any]) -> None:
    ranks = ddp_run["ranks"]
    assert ranks[0]["epochs"] == ranks[1]["epochs"]  # same values and phase at every check
    assert len(ranks[0]["epochs"]) == STOP_EPOCH
    assert ranks[0]["stop"] == ranks[1]["stop"]  # same decision at the same step: both processes ended
    stop = ranks[0]["stop"]
    assert stop["should_stop"] and stop["reason"] == "PATIENCE_EXHAUSTED"
    assert stop["stopped_at_epoch"] == STOP_EPOCH and stop["global_step"] == STOP_EPOCH * STEPS_PER_EPOCH
    assert stop["checked_values"] == [e["loss_epoch"] for e in ranks[0]["epochs"]]
    output = ddp_run["result"].stdout + ddp_run["result"].stderr
    assert output.count(f"PlateauStopping stopped the run at epoch {STOP_EPOCH}") == 1


def test_answer_accuracy_is_synced_over_uneven_shards(ddp_run: dict[str, Any]) -> None:
    ranks = ddp_run["ranks"]
    final = [rank["answer_eval"][-1] for rank in ranks]
    assert final[0] == {**final[1], "seconds": final[0]["seconds"]}  # one global result
    assert final[0]["total"] == NUM_PROBLEMS and final[0]["step"] == STOP_EPOCH * STEPS_PER_EPOCH
    shards = [[s["question"] for s in rank["answer_samples"]] for rank in ranks]
    assert [len(s) for s in shards] == [3, 2]
    # The same problems and weights in one process give the same answers and the same accuracy.
    problems = val_problems()
    assert sorted(shards[0] + shards[1]) == sorted(p["question"] for p in problems)
    module = single_process_module(ddp_run)
    outputs = module.generate([p["question"] for p in problems], max_new_tokens=8, batch_size=32)
    by_question = {s["question"]: s["output"] for rank in ranks for s in rank["answer_samples"]}
    assert outputs == [by_question[p["question"]] for p in problems]
    graded = [grade(o, p["answer"]) for o, p in zip(outputs, problems)]
    assert final[0]["correct"] == sum(g.correct for g in graded)
    assert final[0]["invalid"] == sum(g.invalid for g in graded)
    logged = read_scalars(ddp_run["run_dirs"][0])["val/answer_accuracy"]
    assert logged[-1][1] == pytest.approx(sum(g.correct for g in graded) / NUM_PROBLEMS)


def val_problems() -> list[dict[str, str]]:
    """The problems MathAnswerEval of the fit run solved: the first of the validation split."""
    spec = SyntheticSpec(train_size=TRAIN_SIZE, val_size=VAL_SIZE, test_size=8)
    return MathDataModule(source="synthetic", synthetic=spec).eval_problems("val")[:NUM_PROBLEMS]


def single_process_module(ddp_run: dict[str, Any]) -> TutorModule:
    adapter = ddp_run["run_dirs"][0] / "adapter"
    module = TutorModule(**model_section(ddp_run["base_dir"], adapter_path=str(adapter)))
    module.configure_model()
    module.eval()
    return module


def test_adapter_of_the_two_process_run_loads_in_one_process_with_the_same_logits(
    ddp_run: dict[str, Any],
) -> None:
    module = single_process_module(ddp_run)
    ids = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        logits = module(ids, torch.ones_like(ids)).logits
    for rank in range(WORLD_SIZE):
        trained = torch.load(ddp_run["record_dir"] / f"rank{rank}_logits.pt")
        torch.testing.assert_close(logits, trained, rtol=0, atol=0)
    fresh = TutorModule(**model_section(ddp_run["base_dir"]))
    fresh.configure_model()
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(ids, torch.ones_like(ids)).logits, logits)  # training changed it


def test_validate_from_the_ddp_checkpoint_on_two_processes_matches_one_process_accuracy(
    ddp_run: dict[str, Any], tmp_path: Path
) -> None:
    """MathAnswerEval shards the problems and syncs the counts: the 2-process accuracy is the 1-process one."""
    problems = val_problems()
    module = single_process_module(ddp_run)
    outputs = module.generate([p["question"] for p in problems], max_new_tokens=8, batch_size=32)
    # References that make the tutor right on problems 0, 2, 4 and wrong on 1 and 3, so the synced
    # accuracy is neither 0 nor 1 and a count lost or doubled on one process would show.
    rows = []
    for index, (problem, output) in enumerate(zip(problems, outputs)):
        number = extract_answer(output) or "7"
        rows.append({"question": problem["question"], "answer": f"#### {number}{'1' if index % 2 else ''}"})
    problems_file = tmp_path / "problems.jsonl"
    problems_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    correct = sum(grade(output, row["answer"]).correct for output, row in zip(outputs, rows))
    assert 0 < correct < NUM_PROBLEMS
    config = tiny_config(
        tmp_path,
        trainer={
            **ddp_trainer(),
            "callbacks": [
                {
                    "class_path": "callbacks.math_eval.MathAnswerEval",
                    "init_args": {
                        "problems_file": str(problems_file),
                        "num_problems": NUM_PROBLEMS,
                        "max_new_tokens": 8,
                    },
                }
            ],
        },
        model=model_section(ddp_run["base_dir"]),
        data={"synthetic": {"train_size": TRAIN_SIZE, "val_size": VAL_SIZE, "test_size": 8}},
    )
    checkpoint = ddp_run["run_dirs"][0] / "checkpoints" / "last.ckpt"
    result = run_cli(
        "validate",
        "--config",
        str(write_yaml(tmp_path / "validate.yaml", config)),
        "--ckpt_path",
        str(checkpoint),
        cwd=tmp_path,
    )
    assert (
        result.stdout.count(f"answer accuracy {correct / NUM_PROBLEMS:.3f} ({correct}/{NUM_PROBLEMS})") == 1
    )
    (run_dir,) = sorted((tmp_path / "lightning_logs").glob("version_*"))
    logged = read_scalars(run_dir)["val/answer_accuracy"]
    assert len(logged) == 1 and logged[0][1] == pytest.approx(correct / NUM_PROBLEMS)


def test_fit_resumes_from_the_ddp_checkpoint_on_two_processes(
    ddp_run: dict[str, Any], tmp_path: Path
) -> None:
    """`fit --ckpt_path last.ckpt` continues a 2-process run where it stopped, on two processes."""
    checkpoint = ddp_run["run_dirs"][0] / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    config = tiny_config(
        tmp_path,
        trainer={
            **ddp_trainer(),
            "max_epochs": saved["epoch"] + 3,
            "accumulate_grad_batches": ACCUMULATION,
            "limit_val_batches": 0,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True},
                }
            ],
        },
        model=model_section(ddp_run["base_dir"]),
        data={
            "synthetic": {"train_size": TRAIN_SIZE, "val_size": VAL_SIZE, "test_size": 8},
            "batch_size": MICRO_BATCH,
        },
    )
    config_path = write_yaml(tmp_path / "resume.yaml", config)
    run_cli("fit", "--config", str(config_path), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    run_dir = checkpoint.parent.parent  # the resumed run continues the run's own directory
    assert not (tmp_path / "lightning_logs").exists()
    scalars = read_scalars(run_dir)
    steps = [step for step, _ in scalars["train/loss"]]
    assert len(steps) == len(set(steps))  # one history: no step logged twice
    epochs_trained = len(scalars["train/loss_epoch"]) - STOP_EPOCH
    assert epochs_trained >= 1
    steps_per_epoch = TRAIN_SIZE // (WORLD_SIZE * MICRO_BATCH * ACCUMULATION)
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == saved["global_step"] + epochs_trained * steps_per_epoch


def test_predict_on_two_processes_writes_every_question_once_in_input_order(
    ddp_run: dict[str, Any], tmp_path: Path
) -> None:
    # 5 questions in batches of 2 on 2 processes: uneven shards, which Lightning pads with a repeat.
    questions = [f"Ana has {n} apples and buys 2 more. How many apples does she have?" for n in range(5)]
    questions_path = tmp_path / "questions.jsonl"
    questions_path.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    output = tmp_path / "predictions.jsonl"
    adapter = ddp_run["run_dirs"][0] / "adapter"
    config = tiny_config(
        tmp_path,
        trainer=ddp_trainer(),
        model=model_section(ddp_run["base_dir"], adapter_path=str(adapter), max_new_tokens=4),
        data={"predict_path": str(questions_path), "batch_size": 2},
    )
    run_cli(
        "predict",
        "--config",
        str(write_yaml(tmp_path / "predict.yaml", config)),
        "--trainer.callbacks+=callbacks.predictions.PredictionWriter",
        f"--trainer.callbacks.output_path={output}",
        cwd=tmp_path,
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["question"] for row in rows] == questions
