"""Token-weighted gradient accumulation: an optimizer step's loss is the sum of its micro-batches' token
losses (on all processes) over their total target tokens, so the layout of the same 16 examples (micro-batch
1 x accumulation 16, 4 x 4, 16 x 1, 2 processes x 8) does not change the gradient, and a step that
limit_train_batches cuts short counts only the micro-batches it trains.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from phi2tutor.data import MathDataModule, collate_examples
from phi2tutor.loading import bundled_tokenizer_dir
from phi2tutor.model import TutorModule
from phi2tutor.synthetic import SyntheticSpec
from tests.conftest import TINY_PHI, tiny_config, write_yaml

EXAMPLES = 16
SYNTHETIC = {"train_size": EXAMPLES, "val_size": 4, "test_size": 4, "two_step_share": 0.5}


class FirstStepGradients(Callback):
    """Keeps the trainable weights' gradients of the first optimizer step (before clipping) and the example
    ids of the micro-batches that made it."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}
        self.example_ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.example_ids += batch["example_ids"].tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.gradients:
            self.gradients = {
                name: p.grad.detach().clone()
                for name, p in pl_module.named_parameters()
                if p.grad is not None
            }


class RecordFirstStep(Callback):
    """Test-only, for the 2-process run: gives every LoRA B weight the same non-zero value on each process
    (so every LoRA weight gets a gradient), then writes ``output_dir/rank{N}.pt``: the trainable weights the
    first step started from, its gradients after DDP's all-reduce (before clipping) and the example ids of
    this process's micro-batches in it.

    Args:
        output_dir: directory for the per-process files.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.initial: dict[str, torch.Tensor] = {}
        self.example_ids: list[int] = []
        self.step_tags: list[tuple[int, int]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in pl_module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        self.initial = trainable_weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.example_ids += batch["example_ids"].tolist()
            self.step_tags.append((int(batch["step_target_tokens"]), int(batch["step_processes"])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step:
            return
        gradients = {
            n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "initial": self.initial,
            "gradients": gradients,
            "example_ids": self.example_ids,
            "step_tags": self.step_tags,
            "world_size": trainer.world_size,
        }
        torch.save(record, self.output_dir / f"rank{trainer.global_rank}.pt")


def trainable_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def data_module(micro_batch: int) -> MathDataModule:
    return MathDataModule(
        source="synthetic",
        synthetic=SyntheticSpec(**SYNTHETIC),
        batch_size=micro_batch,
        max_length=128,
        group_by_length=False,
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
    )


def tutor(initial: dict[str, torch.Tensor] | None = None) -> TutorModule:
    """The tiny tutor: seeded LoRA with non-zero B (so every LoRA weight gets a gradient), or ``initial``'s
    trainable weights."""
    seed_everything(0)  # the same LoRA initialisation in every layout
    module = TutorModule(model_config=dict(TINY_PHI), lora_r=4, lora_dropout=0.0)
    module.configure_model()
    if initial is not None:
        missing = module.load_state_dict(initial, strict=False)
        assert not missing.unexpected_keys
        assert set(initial) == {n for n, p in module.named_parameters() if p.requires_grad}
        return module
    torch.manual_seed(1)
    for name, parameter in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return module


def first_step(
    micro_batch: int, accumulation: int, limit_train_batches: int | float = 1.0
) -> FirstStepGradients:
    recorder = FirstStepGradients()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulation,
        limit_train_batches=limit_train_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(tutor(), datamodule=data_module(micro_batch))
    return recorder


def one_batch_gradients(
    example_ids: list[int] | None = None,
    per_example_mean: bool = False,
    initial: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The gradient of the mean token loss of the examples (default all 16) as one batch (or, for contrast,
    of the mean of each example's own token mean: every example weighing the same, as before)."""
    data = data_module(EXAMPLES)
    data.setup("fit")
    examples = data.datasets["train"].examples
    if example_ids is not None:
        examples = [examples[i] for i in example_ids]
    module = tutor(initial)
    pad = data.tokenizer.pad_token_id
    if per_example_mean:
        loss = sum(module.target_token_loss(collate_examples([e], pad)) for e in examples) / len(examples)
    else:
        loss = module.target_token_loss(collate_examples(examples, pad))
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_gradients(
    got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], layout: str
) -> None:
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-7, msg=f"{layout} {name}")


def test_same_gradient_for_1x16_4x4_and_16x1() -> None:
    reference = one_batch_gradients()
    equal_weights = one_batch_gradients(per_example_mean=True)
    data = data_module(EXAMPLES)
    data.setup("fit")
    lengths = {e.target_tokens for e in data.datasets["train"].examples}
    assert len(lengths) > 1  # answers of different lengths: the weighting matters
    # The old weighting (each micro-batch's mean, averaged) is measurably another gradient.
    assert any(not torch.allclose(equal_weights[n], reference[n], rtol=1e-3, atol=1e-6) for n in reference)
    for micro_batch, accumulation in ((16, 1), (4, 4), (1, 16)):
        recorded = first_step(micro_batch, accumulation)
        assert sorted(recorded.example_ids) == list(range(EXAMPLES))
        assert_same_gradients(recorded.gradients, reference, f"{micro_batch}x{accumulation}")


def test_same_gradient_on_2_processes_x_8(tmp_path: Path) -> None:
    """Micro-batch 1 x accumulation 8 on each of 2 DDP processes (gloo, the real CLI): the first step's
    all-reduced gradient is the one-batch gradient of all 16 examples from the same weights."""
    from tests.test_ddp import ddp_trainer, run_cli

    record_dir = tmp_path / "ranks"
    config = tiny_config(
        tmp_path,
        trainer={
            **ddp_trainer(),
            "max_steps": 1,
            "accumulate_grad_batches": 8,
            "limit_val_batches": 0,
            "logger": False,
            "enable_checkpointing": False,
            "callbacks": [
                {
                    "class_path": "tests.test_accumulation.RecordFirstStep",
                    "init_args": {"output_dir": str(record_dir)},
                }
            ],
        },
        data={"synthetic": SYNTHETIC, "batch_size": 1, "group_by_length": False},
    )
    run_cli("fit", "--config", str(write_yaml(tmp_path / "ddp.yaml", config)), cwd=tmp_path)
    ranks = [torch.load(record_dir / f"rank{rank}.pt") for rank in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 8 micro-batches each, disjoint, together the 16 examples; every one tagged with the whole step.
    assert [len(r["example_ids"]) for r in ranks] == [8, 8]
    assert sorted(ranks[0]["example_ids"] + ranks[1]["example_ids"]) == list(range(EXAMPLES))
    data = data_module(EXAMPLES)
    data.setup("fit")
    total = sum(e.target_tokens for e in data.datasets["train"].examples)
    for rank in ranks:
        assert rank["step_tags"] == [(total, 2)] * 8
    reference = one_batch_gradients(initial=ranks[0]["initial"])
    for rank, record in enumerate(ranks):
        assert_same_gradients(record["gradients"], reference, f"2 processes x 8, rank {rank}")


def test_a_step_cut_by_limit_train_batches_counts_only_its_trained_micro_batches() -> None:
    # Accumulation 4 of micro-batch 4, but limit_train_batches 1: Lightning steps after the one micro-batch.
    # Its 4 examples alone make the step's token mean (the tag used to count all 16 of the block).
    recorded = first_step(micro_batch=4, accumulation=4, limit_train_batches=1)
    assert len(recorded.example_ids) == 4
    assert_same_gradients(recorded.gradients, one_batch_gradients(recorded.example_ids), "1 of 4 x 4")


def sampler_batches(micro_batch: int, accumulation: int, **trainer_options) -> list[dict[str, torch.Tensor]]:
    """The training loader's batches for a Trainer's settings, cut where Lightning cuts the epoch."""
    data = data_module(micro_batch)
    data.setup("fit")
    trainer = Trainer(
        accelerator="cpu", accumulate_grad_batches=accumulation, logger=False, max_epochs=1, **trainer_options
    )
    data.trainer = trainer
    batches = list(data.train_dataloader())
    limit = trainer_options.get("limit_train_batches", 1.0)
    count = limit if isinstance(limit, int) else int(len(batches) * limit)
    return batches[:count]


def test_sampler_tags_each_batch_with_its_steps_trained_target_tokens() -> None:
    data = data_module(4)
    data.setup("fit")
    examples = data.datasets["train"].examples

    def tokens(batches) -> int:
        return sum(examples[i].target_tokens for b in batches for i in b["example_ids"].tolist())

    batches = sampler_batches(4, 2)
    assert len(batches) == 4
    for step in (batches[0:2], batches[2:4]):
        assert [int(b["step_target_tokens"]) for b in step] == [tokens(step)] * 2
        assert [int(b["step_processes"]) for b in step] == [1, 1]
    # limit_train_batches 3 (an int) and 0.75 (a share of the 4): the second step trains batch 3 alone.
    for limit in (3, 0.75):
        batches = sampler_batches(4, 2, limit_train_batches=limit)
        assert len(batches) == 3
        assert [int(b["step_target_tokens"]) for b in batches] == [tokens(batches[:2])] * 2 + [
            tokens(batches[2:])
        ]
