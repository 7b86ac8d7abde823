"""data.batch_size: auto (callbacks.micro_batch.AutoMicroBatch): the planner's micro-batch and the accumulation
that keeps the effective batch, through the real CLI (config.yaml, run.json, plan, resume); the first-step
check's back-off on an injected CUDA out-of-memory error through the real Trainer on the CPU, and on a
CUDA device when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from callbacks.memory import GPUMemoryProfiler
from callbacks.micro_batch import AutoMicroBatch
from phi2tutor.data import MathDataModule
from phi2tutor.loading import bundled_tokenizer_dir
from phi2tutor.memory.planner import (
    AUTO_BATCH_MARGIN,
    DEFAULT_BUDGET_MB,
    auto_budget,
    choose_micro_batch,
    estimate_memory,
    estimate_settings,
    max_micro_batch_that_fits,
    plan_from_config_dict,
    smaller_micro_batch,
)
from phi2tutor.model import TutorModule
from phi2tutor.synthetic import SyntheticSpec
from tests.conftest import TINY_PHI, tiny_config, write_yaml

# The tiny model's planned card peak is 350 MB of CUDA context + about 2 MB per example: at 403 MB the
# planner fits 6 examples under the 10% margin (362.7 MB), and 4 is the largest that divides 8.
BUDGET_MB = 403
EFFECTIVE = 8
TRAIN_SIZE = 48


def planned(config: dict, micro_batch: int):
    """The planner's estimate of a tiny config at a micro-batch, from the config's own sections."""
    sections = {
        "model": config["model"],
        "data": {**config["data"], "batch_size": 1},
        "trainer": config["trainer"],
    }
    estimate = plan_from_config_dict(sections)
    return estimate, estimate_memory(
        estimate.model, **{**estimate_settings(estimate), "micro_batch": micro_batch}
    )


def test_the_choice_is_the_largest_divisor_under_the_margin(tmp_path: Path) -> None:
    estimate, _ = planned(tiny_config(tmp_path), 1)
    largest = max_micro_batch_that_fits(
        estimate.model, BUDGET_MB * (1 - AUTO_BATCH_MARGIN), **estimate_settings(estimate)
    )
    assert largest == 6  # the premise of the tests below
    choice = choose_micro_batch(estimate, BUDGET_MB, EFFECTIVE)
    assert (choice.micro_batch, choice.accumulate_grad_batches, choice.largest_within_margin) == (4, 2, 6)
    assert (
        choice.estimate.settings["micro_batch"] == 4
        and choice.estimate.settings["accumulate_grad_batches"] == 2
    )
    # 2 devices share the 8 examples: 4 each, 4 fits: accumulation 1.
    two = choose_micro_batch(estimate, BUDGET_MB, EFFECTIVE, replicas=2)
    assert (two.micro_batch, two.accumulate_grad_batches) == (4, 1)
    # An effective batch of 7 (prime) leaves micro-batch 1 x 7; a budget under micro-batch 1 reports it.
    assert choose_micro_batch(estimate, BUDGET_MB, 7).micro_batch == 1
    tight = choose_micro_batch(estimate, 300, EFFECTIVE)
    assert (tight.micro_batch, tight.fits) == (1, False) and "Not even micro-batch 1" in tight.describe()
    with pytest.raises(ValueError, match="not a multiple of the 3 devices"):
        choose_micro_batch(estimate, BUDGET_MB, EFFECTIVE, replicas=3)
    assert [smaller_micro_batch(12, size) for size in (12, 6, 4, 3, 2, 1)] == [6, 4, 3, 2, 1, None]


def test_the_budget_auto_plans_for_is_said_never_guessed() -> None:
    assert auto_budget(4096, None) == (4096, "GPUMemoryProfiler.budget_mb")  # the CPU: the config's budget
    assert auto_budget(4096, 80_000) == (4096, "GPUMemoryProfiler.budget_mb")  # a larger card: still 4 GB
    budget, source = auto_budget(4096, 4040)  # a 4 GB card's usable memory is under 4096 MiB
    assert budget == 4040 and source.startswith("the CUDA device's total memory, under GPUMemoryProfiler")
    assert auto_budget(None, 8192) == (8192, "the CUDA device's total memory")
    budget, source = auto_budget(None, None)  # the CPU without a profiler: the default, and it says so
    assert budget == DEFAULT_BUDGET_MB == 4096 and "the config has no GPUMemoryProfiler budget_mb" in source


# --------------------------------------------------------------------------- through the CLI
def auto_config(tmp_path: Path) -> dict:
    """The tiny config with data.batch_size auto and no effective batch given: the effective batch is the
    config's accumulation at micro-batch 1, trainer.accumulate_grad_batches 8 (as in the shipped configs)."""
    config = tiny_config(tmp_path, trainer={"max_epochs": 1, "accumulate_grad_batches": EFFECTIVE})
    config["data"]["batch_size"] = "auto"
    config["data"]["synthetic"]["train_size"] = TRAIN_SIZE
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.memory.GPUMemoryProfiler", "init_args": {"budget_mb": BUDGET_MB}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "callbacks.report.TrainingReport", "init_args": {"figures": False}},
    ]
    return config


def test_auto_through_the_cli_config_yaml_run_json_plan_and_resume(tmp_path: Path, capsys, caplog) -> None:
    from phi2tutor.cli import main
    from phi2tutor.memory.plan_command import main_plan

    config = auto_config(tmp_path)
    path = write_yaml(tmp_path / "auto.yaml", config)
    _, at_four = planned(config, 4)
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(path)])
    run_dir = tmp_path / "lightning_logs" / "version_0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    # config.yaml holds the numbers the run trained with: it reruns (and resumes) as they are.
    assert (saved["data"]["batch_size"], saved["data"]["effective_batch_size"]) == (4, EFFECTIVE)
    assert saved["trainer"]["accumulate_grad_batches"] == 2
    run = json.loads((run_dir / "run.json").read_text())
    micro = run["micro_batch"]
    assert (micro["batch_size"], micro["accumulate_grad_batches"], micro["effective_batch_size"]) == (4, 2, 8)
    assert micro["auto"] and micro["configured"] == {
        "batch_size": "auto",
        "effective_batch_size": None,
        "accumulate_grad_batches": EFFECTIVE,
    }
    assert micro["effective_batch_size_from"].startswith("trainer.accumulate_grad_batches x devices x nodes")
    assert (
        micro["choice"]["largest_within_margin"] == 6
        and micro["budget_from"] == "GPUMemoryProfiler.budget_mb"
    )
    assert micro["choice"]["planned_peak_mb"] == round(at_four.estimated_peak_mb, 1)
    assert micro["first_step"] == {
        "checked": False,
        "reason": "no CUDA device, the first step is not checked against a real peak: the planner's size is used",
    }
    assert run["global_step"] == TRAIN_SIZE // EFFECTIVE  # 12 micro-batches of 4, 2 per optimizer step
    assert (
        "phi2tutor | data.batch_size auto (403 MB budget: GPUMemoryProfiler.budget_mb): micro-batch 4 x "
        "accumulation 2 x 1 device = effective batch 8" in caplog.text
    )
    assert "trainer.accumulate_grad_batches 8 -> 2" in caplog.text
    caplog.clear()

    # `phi2tutor plan` says the same before anything is loaded.
    main_plan(["--config", str(path), "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["auto_micro_batch"] == {"batch_size_is_auto": True, **micro["choice"]}
    assert plan["settings"]["micro_batch"] == 4 and plan["settings"]["accumulate_grad_batches"] == 2
    main_plan(["--config", str(path), "--data.batch_size", "1"])
    assert (
        "data.batch_size auto would pick (budget 403 MB: GPUMemoryProfiler.budget_mb): micro-batch 4 x "
        "accumulation 2 x 1 device = effective batch 8" in capsys.readouterr().out
    )

    # Resumed with auto: the run's own numbers (not a new choice), so the option check passes.
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert "data.batch_size auto: the run's micro-batch 4 x accumulation 2 (effective batch 8)" in caplog.text
    run = json.loads((run_dir / "run.json").read_text())
    assert run["global_step"] == 2 * TRAIN_SIZE // EFFECTIVE and run["micro_batch"]["auto"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["accumulate_grad_batches"] == 2
    # The option auto was resolved from changed: that is another run.
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.accumulate_grad_batches", "16"])
    assert stopped.value.code == 2
    assert "trainer.accumulate_grad_batches: auto was resolved from 8 in the checkpoint's run, 16 now" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- the first-step check
class OutOfMemoryAbove(TutorModule):
    """TutorModule whose training step raises CUDA's out-of-memory error for micro-batches above a limit, as
    a card with that much memory would; it records the size of every micro-batch it is given."""

    def __init__(self, *args, memory_limit: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.memory_limit = memory_limit
        self.seen: list[tuple[int, int]] = []  # (micro-batch, longest example's tokens)

    def training_step(self, batch, batch_idx):
        size = batch["input_ids"].shape[0]
        self.seen.append((size, int(batch["attention_mask"].sum(dim=1).max())))
        if size > self.memory_limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super().training_step(batch, batch_idx)


class CheckedOnThisDevice(AutoMicroBatch):
    """The first-step check on whatever device the test runs on (on the CPU it would be skipped)."""

    def unchecked_reason(self, trainer):
        return None


def fit_tiny(
    tmp_path: Path,
    batch_size: int | str,
    accumulation: int,
    callbacks: list,
    memory_limit: int,
    accelerator: str = "cpu",
    module_class: type[OutOfMemoryAbove] = OutOfMemoryAbove,
):
    seed_everything(3)
    module = module_class(
        model_config=dict(TINY_PHI),
        lora_r=4,
        lora_dropout=0.0,
        learning_rate=0.003,
        memory_limit=memory_limit,
    )
    data = MathDataModule(
        source="synthetic",
        synthetic=SyntheticSpec(train_size=TRAIN_SIZE, val_size=8, test_size=8),
        batch_size=batch_size,
        effective_batch_size=EFFECTIVE if batch_size == "auto" else None,
        max_length=128,
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
    )
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        accumulate_grad_batches=accumulation,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=[GPUMemoryProfiler(budget_mb=BUDGET_MB), *callbacks],
    )
    trainer.fit(module, datamodule=data)
    lora = {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}
    return trainer, module, data, lora


def test_first_step_backs_off_one_size_on_out_of_memory_and_the_run_is_the_plain_one(tmp_path: Path) -> None:
    auto = CheckedOnThisDevice()
    trainer, module, data, lora = fit_tiny(tmp_path / "auto", "auto", 1, [auto], memory_limit=2)
    # The planner chose 4 x 2; the check's first micro-batch at 4 ran out of memory; 2 (the next size that
    # divides 8) fitted over two accumulated micro-batches; the run trained at 2 x 4.
    longest = max(len(example.input_ids) for example in data.datasets["train"].examples)
    check, run = module.seen[:3], module.seen[3:]
    assert [size for size, _ in check] == [4, 2, 2]
    assert check[0][1] == longest  # the check runs on the longest examples
    assert {size for size, _ in run} == {2} and len(run) == TRAIN_SIZE // 2
    assert (data.hparams.batch_size, trainer.accumulate_grad_batches, trainer.global_step) == (2, 4, 6)
    record = auto.run_record(trainer)
    assert record["choice"]["micro_batch"] == 4 and record["choice"]["largest_within_margin"] == 6
    assert record["first_step"] == {
        "checked": True,
        "out_of_memory_at": [4],
        "micro_batch": 2,
        "longest_example_tokens": longest,
        "measured_peak_allocated_mb": None,  # no CUDA device to measure
    }
    numbers = (record["batch_size"], record["accumulate_grad_batches"], record["effective_batch_size"])
    assert numbers == (2, 4, 8)
    assert not list(tmp_path.rglob("*.ckpt")), "the check's checkpoint is removed"
    # The check left nothing behind: same weights as a run configured 2 x 4 from the start, same seed.
    _, plain_module, _, plain_lora = fit_tiny(tmp_path / "plain", 2, 4, [], memory_limit=2)
    assert [size for size, _ in plain_module.seen] == [size for size, _ in run]
    for name, weight in plain_lora.items():
        torch.testing.assert_close(lora[name], weight, msg=name)


def test_out_of_memory_at_micro_batch_1_fails_as_before(tmp_path: Path) -> None:
    auto = CheckedOnThisDevice()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fit_tiny(tmp_path, "auto", 1, [auto], memory_limit=0)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_first_step_check_on_a_cuda_device(tmp_path: Path) -> None:
    """The real check on CUDA: a real out-of-memory error from the allocator above micro-batch 2, the peak of
    the step that fitted measured, the run at 2 x 4 equal to a plain 2 x 4 run."""

    class AllocatorOutOfMemoryAbove(OutOfMemoryAbove):
        def training_step(self, batch, batch_idx):
            if batch["input_ids"].shape[0] > self.memory_limit:
                torch.empty(1 << 50, dtype=torch.uint8, device=self.device)  # a real CUDA OOM
            return super().training_step(batch, batch_idx)

    auto = AutoMicroBatch()
    trainer, _, data, lora = fit_tiny(
        tmp_path / "auto", "auto", 1, [auto], 2, accelerator="gpu", module_class=AllocatorOutOfMemoryAbove
    )
    _, _, _, plain_lora = fit_tiny(tmp_path / "plain", 2, 4, [], 2, accelerator="gpu")
    first_step = auto.run_record(trainer)["first_step"]
    assert first_step["checked"] and first_step["out_of_memory_at"] == [4] and first_step["micro_batch"] == 2
    assert 0 < first_step["measured_peak_allocated_mb"] < BUDGET_MB
    assert (data.hparams.batch_size, trainer.accumulate_grad_batches) == (2, 4)
    for name, weight in plain_lora.items():
        # CUDA's attention backward may sum in another order from run to run: equal up to rounding.
        torch.testing.assert_close(lora[name], weight, rtol=1e-3, atol=1e-5, msg=name)
