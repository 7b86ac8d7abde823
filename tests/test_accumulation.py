"""Token-weighted gradient accumulation: an optimizer step's loss is the sum of its micro-batches' token
losses over their total target tokens, so the layout of the same 16 examples does not change the gradient.
(The 2-process x 8 layout is checked in tests/test_ddp.py on its recorded first step.)
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from phi2tutor.data import MathDataModule, collate_examples
from phi2tutor.loading import bundled_tokenizer_dir
from phi2tutor.model import TutorModule
from phi2tutor.synthetic import SyntheticSpec
from tests.conftest import TINY_PHI

EXAMPLES = 16


class FirstStepGradients(Callback):
    """Keeps the trainable weights' gradients of the first optimizer step (before clipping)."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.gradients:
            self.gradients = {
                name: p.grad.detach().clone()
                for name, p in pl_module.named_parameters()
                if p.grad is not None
            }


def data_module(micro_batch: int) -> MathDataModule:
    return MathDataModule(
        source="synthetic",
        synthetic=SyntheticSpec(train_size=EXAMPLES, val_size=4, test_size=4, two_step_share=0.5),
        batch_size=micro_batch,
        max_length=128,
        group_by_length=False,
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
    )


def tutor() -> TutorModule:
    seed_everything(0)  # the same LoRA initialisation in every layout
    module = TutorModule(model_config=dict(TINY_PHI), lora_r=4, lora_dropout=0.0)
    module.configure_model()
    torch.manual_seed(1)
    for name, parameter in module.named_parameters():
        if "lora_B" in name:  # non-zero B, so every LoRA weight gets a gradient
            torch.nn.init.normal_(parameter, std=0.05)
    return module


def first_step_gradients(micro_batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    recorder = FirstStepGradients()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulation,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(tutor(), datamodule=data_module(micro_batch))
    return recorder.gradients


def one_batch_gradients(per_example_mean: bool = False) -> dict[str, torch.Tensor]:
    """The gradient of the mean token loss of all 16 examples as one batch (or, for contrast, of the mean
    of each example's own token mean: every example weighing the same, as before)."""
    data = data_module(EXAMPLES)
    data.setup("fit")
    examples = data.datasets["train"].examples
    module = tutor()
    pad = data.tokenizer.pad_token_id
    if per_example_mean:
        loss = sum(module.target_token_loss(collate_examples([e], pad)) for e in examples) / len(examples)
    else:
        loss = module.target_token_loss(collate_examples(examples, pad))
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


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
        gradients = first_step_gradients(micro_batch, accumulation)
        assert gradients.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(
                gradients[name],
                reference[name],
                rtol=1e-4,
                atol=1e-7,
                msg=f"{micro_batch}x{accumulation} {name}",
            )


def test_sampler_tags_each_batch_with_its_steps_target_tokens() -> None:
    data = data_module(4)
    data.setup("fit")
    examples = data.datasets["train"].examples
    trainer = Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=False, max_epochs=1)
    data.trainer = trainer
    batches = list(data.train_dataloader())
    assert len(batches) == 4
    for first, second in (batches[0:2], batches[2:4]):
        ids = first["example_ids"].tolist() + second["example_ids"].tolist()
        expected = sum(examples[i].target_tokens for i in ids)
        assert int(first["step_target_tokens"]) == int(second["step_target_tokens"]) == expected
