"""GPUMemoryProfiler through the real Trainer on a tiny Phi: logged scalars read back from TensorBoard,
memory.json against the printed table, the budget warning, and a simulated CUDA out-of-memory error."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from callbacks.memory import MEMORY_JSON, SNAPSHOT_FILE, GPUMemoryProfiler, MemoryBudgetWarning
from phi2tutor.errors import explanation
from phi2tutor.memory import estimate_memory, plan_from_hparams
from tests.conftest import TINY_PHI


class TinyPhiLM(LightningModule):
    """A tiny PhiForCausalLM trained in full; optionally 'runs out of memory' at one step."""

    def __init__(self, out_of_memory_at_step: int | None = None, with_estimate: bool = False) -> None:
        super().__init__()
        from transformers import PhiConfig, PhiForCausalLM

        torch.manual_seed(0)
        self.model = PhiForCausalLM(PhiConfig(**TINY_PHI))
        self.out_of_memory_at_step = out_of_memory_at_step
        if with_estimate:
            self.memory_estimate = estimate_memory(
                TINY_PHI,
                quantization="none",
                compute_dtype="float32",
                precision="32-true",
                optimizer="adamw",
                gradient_checkpointing=False,
                micro_batch=4,
                max_length=16,
            )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.out_of_memory_at_step:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 1.56 GiB. GPU 0 has a total capacity of 3.94 GiB"
            )
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(
            torch.randint(0, TINY_PHI["vocab_size"], (48, 16), generator=generator), batch_size=4
        )


def make_trainer(tmp_path: Path, profiler: GPUMemoryProfiler, max_steps: int, **kwargs) -> Trainer:
    kwargs.setdefault("logger", TensorBoardLogger(tmp_path, name="lightning_logs", default_hp_metric=False))
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=tmp_path,
        callbacks=[profiler, *kwargs.pop("callbacks", [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def table_values(text: str) -> dict[str, float]:
    """Rows of the printed memory table: name -> MB."""
    return {
        match.group(1).strip(): float(match.group(2))
        for match in re.finditer(r"^\| ([A-Za-z ]+?)\s+\|\s+([\d.]+) \|", text, flags=re.MULTILINE)
    }


def test_logs_memory_every_n_steps_and_writes_memory_json_with_the_table(tmp_path: Path, caplog) -> None:
    profiler = GPUMemoryProfiler(every_n_steps=2, budget_mb=1e6)
    trainer = make_trainer(tmp_path, profiler, max_steps=6, enable_checkpointing=False)
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyPhiLM(with_estimate=True))
    run_dir = Path(trainer.log_dir)

    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["memory/cpu_rss_mb"]] == [2, 4, 6]
    assert [step for step, _ in scalars["memory/cpu_peak_rss_mb"]] == [2, 4, 6]
    assert "memory/allocated_mb" not in scalars  # no CUDA here: the CPU keys stand in

    record = json.loads((run_dir / MEMORY_JSON).read_text())
    assert record["device"] == "cpu" and record["budget_mb"] == 1e6 and record["oom"] is False
    assert record["allocated_mb"] is None and record["max_allocated_mb"] is None
    assert [s["step"] for s in record["samples"]] == [2, 4, 6]
    for key in ("cpu_rss_mb", "cpu_peak_rss_mb"):
        logged = [value for _, value in scalars[f"memory/{key}"]]
        assert logged == pytest.approx([s[key] for s in record["samples"]], abs=1e-3)  # TB stores float32
    assert 50 < record["cpu_rss_mb"] <= record["cpu_peak_rss_mb"]
    assert record["percent_of_budget"] == round(100 * record["cpu_peak_rss_mb"] / 1e6, 1)
    assert record["estimate"]["estimated_peak_allocated_mb"] == pytest.approx(
        TinyPhiLM(with_estimate=True).memory_estimate.estimated_peak_allocated_mb, abs=0.01
    )

    log = caplog.text
    assert "Memory plan:" in log  # the planner's estimate, printed when fit starts
    rows = table_values(log)
    assert rows["CPU resident"] == record["cpu_rss_mb"]
    assert rows["CPU peak resident"] == record["cpu_peak_rss_mb"]


def test_budget_warning_fires_once_with_advice(tmp_path: Path) -> None:
    profiler = GPUMemoryProfiler(every_n_steps=1, budget_mb=10, warn_fraction=0.9)
    trainer = make_trainer(tmp_path, profiler, max_steps=3, enable_checkpointing=False, logger=False)
    with pytest.warns(MemoryBudgetWarning) as warned:
        trainer.fit(TinyPhiLM())
    budget_warnings = [w for w in warned if issubclass(w.category, MemoryBudgetWarning)]
    assert len(budget_warnings) == 1
    message = str(budget_warnings[0].message)
    assert "of the 10 MB budget" in message
    for advice in ("data.batch_size", "data.max_length", "gradient_checkpointing", "nf4"):
        assert advice in message
    # without a logger the run directory is default_root_dir
    assert json.loads((Path(trainer.default_root_dir) / MEMORY_JSON).read_text())["percent_of_budget"] > 90


def test_no_budget_warning_below_the_line(tmp_path: Path, recwarn) -> None:
    trainer = make_trainer(
        tmp_path, GPUMemoryProfiler(every_n_steps=1, budget_mb=1e6), 2, enable_checkpointing=False
    )
    trainer.fit(TinyPhiLM())
    assert not [w for w in recwarn if issubclass(w.category, MemoryBudgetWarning)]


def test_out_of_memory_gives_clear_message_memory_json_and_intact_last_checkpoint(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    profiler = GPUMemoryProfiler(every_n_steps=1, budget_mb=4096)
    trainer = make_trainer(tmp_path, profiler, max_steps=10, callbacks=[checkpoints])
    module = TinyPhiLM(out_of_memory_at_step=3, with_estimate=True)
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:  # the original error, not replaced
        trainer.fit(module)
    message = explanation(raised.value)  # what the phi2tutor command prints instead of a traceback
    assert message is not None
    assert "ran out of memory at step 3" in message and "of the 4096 MB budget" in message
    assert "Peak of a training step" in message  # the planner's breakdown
    # the advice names the current values and leaves out what the run already does
    for advice in (
        "data.batch_size (now 4)",
        "data.max_length (now 16)",
        "model.gradient_checkpointing",
        "nf4-double",
    ):
        assert advice in message
    assert "Tried to allocate 1.56 GiB" in message  # what PyTorch said, kept

    run_dir = Path(trainer.log_dir)
    record = json.loads((run_dir / MEMORY_JSON).read_text())
    assert record["oom"] is True and record["message"] == message
    assert record["global_step"] == 3 and [s["step"] for s in record["samples"]] == [1, 2, 3]
    assert f"{record['cpu_peak_rss_mb']:.0f} MB" in message
    assert str(run_dir / MEMORY_JSON) in message
    # logged before the error and flushed
    assert [step for step, _ in read_scalars(run_dir)["memory/cpu_rss_mb"]] == [1, 2, 3]

    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    fresh = TinyPhiLM()
    fresh.load_state_dict(last["state_dict"])  # loads whole
    for name, tensor in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name  # the weights of the last good step


def test_other_exceptions_pass_through_unchanged(tmp_path: Path) -> None:
    class Broken(TinyPhiLM):
        def training_step(self, batch, batch_idx):
            raise ValueError("not a memory problem")

    trainer = make_trainer(tmp_path, GPUMemoryProfiler(), 2, enable_checkpointing=False)
    with pytest.raises(ValueError, match="not a memory problem"):
        trainer.fit(Broken())
    assert not (Path(trainer.log_dir) / MEMORY_JSON).exists()


def test_running_tutor_configuration_is_planned_from_its_hparams() -> None:
    """The planner reads TutorModule's and MathDataModule's own fields (nothing is loaded by constructing
    them); TutorModule plans with them when it is configured and the profiler shows that plan."""
    from phi2tutor.data import MathDataModule
    from phi2tutor.model import TutorModule

    module = TutorModule(
        model_config=TINY_PHI,
        quantization="nf4-double",
        compute_dtype="float16",
        lora_r=4,
        lora_target_modules=["q_proj", "fc2"],
        gradient_checkpointing=True,
        optimizer="adamw8bit",
    )
    data = MathDataModule(source="synthetic", batch_size=2, max_length=64)
    estimate = plan_from_hparams(module.hparams, data.hparams, "16-mixed", 4)
    settings = estimate.settings
    assert (settings["quantization"], settings["compute_dtype"], settings["lora_r"]) == (
        "nf4-double",
        "float16",
        4,
    )
    assert settings["lora_target_modules"] == ["q_proj", "fc2"] and settings["optimizer"] == "adamw8bit"
    assert (settings["micro_batch"], settings["max_length"], settings["accumulate_grad_batches"]) == (
        2,
        64,
        4,
    )
    assert settings["gradient_checkpointing"] and settings["attention"] == "phi2tutor_fp32_scores"
    assert estimate.model.hidden_size == TINY_PHI["hidden_size"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keys_and_memory_snapshot(tmp_path: Path) -> None:
    profiler = GPUMemoryProfiler(every_n_steps=1, snapshot_steps=2)
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=3,
        logger=TensorBoardLogger(tmp_path, name="lightning_logs"),
        callbacks=[profiler],
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(TinyPhiLM())
    run_dir = Path(trainer.log_dir)
    scalars = read_scalars(run_dir)
    for key in ("allocated_mb", "reserved_mb", "max_allocated_mb"):
        assert [step for step, _ in scalars[f"memory/{key}"]] == [1, 2, 3]
    record = json.loads((run_dir / MEMORY_JSON).read_text())
    assert 0 < record["allocated_mb"] <= record["max_allocated_mb"] <= record["reserved_mb"]
    assert record["device"] == torch.cuda.get_device_name(0)
    snapshot = run_dir / SNAPSHOT_FILE
    assert snapshot.stat().st_size > 0
    import pickle

    assert "segments" in pickle.loads(snapshot.read_bytes())
