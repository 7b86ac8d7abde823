"""The faster batching paths compute the same loss: length-grouped and padded batches give each
example the loss it has alone, and the loss per target token over a data set does not change.
"""

from __future__ import annotations

import pytest
import torch

from phi2tutor.data import MathDataModule, collate_examples
from phi2tutor.loading import bundled_tokenizer_dir
from phi2tutor.model import TutorModule
from phi2tutor.synthetic import SyntheticSpec
from tests.conftest import TINY_PHI


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These tiny models are all per-op overhead: on a shared 2-core machine a second torch thread only
    # waits on other processes (measured: 1.5 s instead of 0.015 s per forward).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_module(one_torch_thread) -> TutorModule:
    module = TutorModule(model_config=dict(TINY_PHI), lora_r=4, lora_dropout=0.0, init_seed=3)
    torch.manual_seed(3)
    module.configure_model()
    # Fresh LoRA B weights are zero; give the adapter a non-zero contribution so it is exercised too.
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    module.eval()
    return module


@pytest.fixture(scope="module")
def tokenized_data() -> MathDataModule:
    datamodule = MathDataModule(
        source="synthetic",
        synthetic=SyntheticSpec(train_size=40, val_size=8, test_size=8, seed=5),
        batch_size=6,
        max_length=128,
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
    )
    datamodule.setup("fit")
    return datamodule


def target_loss_sum(module: TutorModule, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed cross-entropy over the batch's target tokens, and how many there are."""
    targets = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        return float(module.target_token_loss(batch)) * targets, targets


def loss_per_target_token(module: TutorModule, datamodule: MathDataModule, group_by_length: bool) -> float:
    datamodule.hparams.group_by_length = group_by_length
    total, count = 0.0, 0
    for batch in datamodule.train_dataloader():
        batch_sum, batch_count = target_loss_sum(module, batch)
        total, count = total + batch_sum, count + batch_count
    return total / count


def padding_share(datamodule: MathDataModule, group_by_length: bool) -> float:
    datamodule.hparams.group_by_length = group_by_length
    masks = [batch["attention_mask"] for batch in datamodule.train_dataloader()]
    return 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def test_padding_does_not_change_an_examples_loss(tiny_module, tokenized_data):
    examples = tokenized_data.datasets["train"].examples[:12]
    pad = tokenized_data.tokenizer.pad_token_id
    padded = collate_examples(examples, pad)
    assert int(padded["attention_mask"].sum()) < padded["attention_mask"].numel()  # real padding present
    for row, example in enumerate(examples):
        alone = collate_examples([example], pad)
        in_padded_batch = {key: value[row : row + 1] for key, value in padded.items()}
        with torch.no_grad():
            expected = tiny_module.target_token_loss(alone)
            observed = tiny_module.target_token_loss(in_padded_batch)
        torch.testing.assert_close(observed, expected, rtol=1e-5, atol=1e-5)


def test_length_grouping_keeps_the_loss_per_target_token(tiny_module, tokenized_data):
    plain = loss_per_target_token(tiny_module, tokenized_data, group_by_length=False)
    grouped = loss_per_target_token(tiny_module, tokenized_data, group_by_length=True)
    assert grouped == pytest.approx(plain, rel=1e-5)
    # ... while it computes on less padding, which is where the speed comes from.
    assert padding_share(tokenized_data, group_by_length=True) < padding_share(
        tokenized_data, group_by_length=False
    )


def test_length_grouped_order_covers_every_example_once(tokenized_data):
    tokenized_data.hparams.group_by_length = True
    seen = torch.cat([batch["example_ids"] for batch in tokenized_data.train_dataloader()]).tolist()
    assert sorted(seen) == sorted(e.example_id for e in tokenized_data.datasets["train"].examples)
