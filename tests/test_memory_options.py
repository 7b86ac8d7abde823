"""The memory-saving options of TutorModule (embeddings_on_cpu, offload_checkpoints) on the tiny Phi: the
loss and every LoRA gradient are the same as without them, the embedding table stays in CPU memory when the
model moves, options that cannot take effect are errors, and the planner takes the saved bytes off."""

from __future__ import annotations

import pytest
import torch

from phi2tutor.errors import Phi2TutorError
from phi2tutor.memory import KNOWN_MODEL_CONFIGS, MB, estimate_memory
from phi2tutor.model import TutorModule
from tests.conftest import TINY_PHI

SHAPE = {**TINY_PHI, "resid_pdrop": 0.0}


def loss_and_gradients(**options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module = TutorModule(
        model_config=SHAPE, lora_r=4, lora_dropout=0.0, gradient_checkpointing=True, init_seed=3, **options
    )
    torch.manual_seed(1)  # peft draws LoRA A from the global generator
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (2, 20), generator=generator)
    labels = input_ids.clone()
    labels[:, :8] = -100  # a prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    loss = module.target_token_loss(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "options",
    [
        {"embeddings_on_cpu": True},
        {"offload_checkpoints": True},
        {"embeddings_on_cpu": True, "offload_checkpoints": True},
    ],
    ids=["embeddings_on_cpu", "offload_checkpoints", "both"],
)
def test_memory_options_keep_the_loss_and_gradients_equal(options: dict) -> None:
    reference_loss, reference_grads = loss_and_gradients()
    loss, grads = loss_and_gradients(**options)
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys() and len(grads) == 2 * 6 * SHAPE["num_hidden_layers"]
    for name, grad in grads.items():
        assert torch.equal(grad, reference_grads[name]), name
    # LoRA B starts at zero, so only the B gradients are nonzero on the first step: the test compares real numbers
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if "lora_B" in name)


def test_embedding_table_stays_in_cpu_memory_when_the_model_moves() -> None:
    module = TutorModule(model_config=SHAPE, lora_r=4, embeddings_on_cpu=True)
    module.configure_model()
    embedding = module.model.get_base_model().get_input_embeddings()
    names = [name for name, _ in module.model.named_parameters()]
    assert not any("embed_tokens" in name for name in names)  # not moved, not in checkpoints
    module.model.to("meta")  # as Lightning moves the model to the GPU
    assert embedding.table.weight.device.type == "cpu"
    assert module.model.get_base_model().lm_head.weight.device.type == "meta"


def test_options_that_cannot_take_effect_are_errors() -> None:
    with pytest.raises(Phi2TutorError, match="offload_checkpoints.*needs\\s+model.gradient_checkpointing"):
        TutorModule(model_config=SHAPE, offload_checkpoints=True)
    with pytest.raises(Phi2TutorError, match="embeddings_on_cpu.*modules_to_save"):
        TutorModule(model_config=SHAPE, embeddings_on_cpu=True, modules_to_save=["embed_tokens"])


def test_planner_takes_the_table_and_the_checkpointed_inputs_off() -> None:
    phi2 = KNOWN_MODEL_CONFIGS["microsoft/phi-2"]
    base = estimate_memory(phi2)
    on_cpu = estimate_memory(phi2, embeddings_on_cpu=True)
    table = 51200 * 2560 * 2  # fp16
    assert base.weight_bytes - on_cpu.weight_bytes == table
    for phase, terms in base.phases.items():
        assert sum(nb for _, nb in terms) - sum(nb for _, nb in on_cpu.phases[phase]) == table, phase
    offloaded = estimate_memory(phi2, offload_checkpoints=True)
    inputs = dict(base.phases["loss forward"])["checkpointed decoder layer inputs"]
    assert inputs == (512 * 2560) * (2 + 31 * 4)  # layer 0's input fp16, the fp32 residual stream after it
    # all but layer 0's: the embedding output is a grad-requiring leaf that autograd keeps on the device
    assert dict(offloaded.phases["loss forward"])["checkpointed decoder layer inputs"] == 512 * 2560 * 2
    # each layer's input comes back for its own backward
    back = dict(offloaded.phases["backward of the last decoder layer"])
    assert back["checkpointed input of this layer, back from CPU memory"] == 512 * 2560 * 4
    assert offloaded.estimated_peak_allocated_mb < base.estimated_peak_allocated_mb - 100
    both = estimate_memory(phi2, embeddings_on_cpu=True, offload_checkpoints=True, accumulate_grad_batches=16)
    assert both.estimated_peak_allocated_bytes <= 2048 * MB  # configs/phi2-qlora-3gb.yaml's target
