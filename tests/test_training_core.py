"""Training core through the real CLI, Trainer, transformers, peft and bitsandbytes on a tiny Phi."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from phi2tutor.cli import main
from phi2tutor.data import MathDataModule
from phi2tutor.events import read_scalars
from phi2tutor.loading import bundled_tokenizer_dir
from phi2tutor.model import TutorModule, warmup_cosine_schedule
from phi2tutor.synthetic import SyntheticSpec
from tests.conftest import TINY_PHI, tiny_config, write_yaml


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "lightning_logs").glob("version_*"))


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    """One tiny fit through the CLI, shared by the tests that read its output."""
    tmp_path = tmp_path_factory.mktemp("fit")
    config = tiny_config(tmp_path, trainer={"max_epochs": 3})
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    config["model"]["adapter_output_dir"] = str(tmp_path / "models" / "tutor")
    main(["fit", "--config", str(write_yaml(tmp_path / "fit.yaml", config))])
    return run_dirs(tmp_path)[-1]


def test_fit_logs_loss_grad_norm_and_lr_and_loss_falls(fitted_run: Path) -> None:
    scalars = read_scalars(fitted_run)
    for tag in ("train/loss", "train/loss_epoch", "train/grad_norm", "train/lr", "val/loss"):
        assert scalars.get(tag), f"{tag} missing from {sorted(scalars)}"
    epoch_losses = [v for _, v in scalars["train/loss_epoch"]]
    assert len(epoch_losses) == 3
    assert epoch_losses[-1] < epoch_losses[0]
    # one grad norm and one lr per optimizer step (6 examples batches of 8 -> 6 steps/epoch x 3)
    assert len(scalars["train/grad_norm"]) == len(scalars["train/lr"]) == 18
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["train/grad_norm"])
    lrs = [v for _, v in scalars["train/lr"]]
    peak = max(lrs)
    assert peak == pytest.approx(0.003, rel=1e-6)
    assert lrs[0] < peak and lrs[-1] < 0.1 * peak  # warmup, then cosine down towards the floor


def test_warmup_cosine_shape_matches_reference_run() -> None:
    total, warmup = 1000, 120  # the reference run peaked at ~12% of training

    def factors(min_lr_ratio: float, steps: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = warmup_cosine_schedule(optimizer, warmup, total, min_lr_ratio)
        values = []
        for _ in range(steps):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return values

    lrs = factors(0.0, total)
    assert max(range(total), key=lrs.__getitem__) == warmup
    assert lrs[1] == pytest.approx(1 / 120)
    assert lrs[-1] < 1e-4
    floored = factors(0.1, total + 200)  # past the schedule (lr_schedule_epochs): held at the floor
    assert floored[total:] == pytest.approx([0.1] * 200)


def test_checkpoint_holds_only_trainable_weights(fitted_run: Path) -> None:
    checkpoint = torch.load(fitted_run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = list(checkpoint["state_dict"])
    # The LoRA weights, and the running train/loss_epoch mean (two scalars) a mid-epoch resume continues.
    weights = [key for key in keys if not key.startswith("train_epoch_loss.")]
    assert sorted(set(keys) - set(weights)) == ["train_epoch_loss.mean_value", "train_epoch_loss.weight"]
    assert weights and all("lora_" in key for key in weights)
    assert not any("base_layer" in key or "embed_tokens" in key for key in keys)
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    assert checkpoint["lr_schedule"] == {"warmup_steps": 2, "schedule_steps": 18}  # 12% of 3 x 6 steps


def test_resume_with_a_longer_max_epochs_keeps_the_learning_rate_schedule(
    fitted_run: Path, tmp_path: Path, caplog
) -> None:
    """A schedule over the whole run (no lr_schedule_epochs) is not stretched by a resume with max_epochs
    4 instead of 3: the rate goes on as it was, held at the floor after its 18 steps, and it is said."""
    import shutil

    shutil.copytree(fitted_run.parent.parent, tmp_path / "run")
    root = tmp_path / "run"
    config = tiny_config(root, trainer={"max_epochs": 4})
    config["model"]["adapter_output_dir"] = str(root / "models" / "tutor")
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(write_yaml(root / "resume.yaml", config)), "--ckpt_path", "last"])
    lrs = read_scalars(run_dirs(root)[-1])["train/lr"]
    assert [step for step, _ in lrs] == list(range(24))
    assert lrs[:18] == read_scalars(fitted_run)["train/lr"]  # the first segment, untouched
    assert [value for _, value in lrs[18:]] == [0.0] * 6  # the cosine ended at step 18: the floor
    assert (
        "learning-rate schedule kept from the checkpoint: warmup 2 + cosine to 18 optimizer steps (this "
        "run's options would make it 3 + 24" in caplog.text
    )


def test_adapter_saved_in_run_and_output_dirs_reloads_with_identical_logits(fitted_run: Path) -> None:
    run_adapter = fitted_run / "adapter"
    output_adapter = fitted_run.parent.parent / "models" / "tutor"
    for directory in (run_adapter, output_adapter):
        assert (directory / "adapter_model.safetensors").is_file()
        assert (directory / "adapter_config.json").is_file()
        assert (directory / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    from_adapter = TutorModule(model_config=dict(TINY_PHI), lora_r=4, adapter_path=str(run_adapter))
    from_adapter.configure_model()
    from_checkpoint = TutorModule(model_config=dict(TINY_PHI), lora_r=4)
    from_checkpoint.configure_model()
    state = torch.load(fitted_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    from_checkpoint.load_state_dict(state, strict=False)
    fresh = TutorModule(model_config=dict(TINY_PHI), lora_r=4)
    fresh.configure_model()
    for module in (from_adapter, from_checkpoint, fresh):
        module.eval()
    with torch.no_grad():
        a = from_adapter(ids, torch.ones_like(ids)).logits
        b = from_checkpoint(ids, torch.ones_like(ids)).logits
        c = fresh(ids, torch.ones_like(ids)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)  # the adapter changed the model


def test_validate_through_cli_reports_val_loss(fitted_run: Path, capsys) -> None:
    config_path = fitted_run / "config.yaml"  # saved by LightningCLI at fit time
    main(
        [
            "validate",
            "--config",
            str(config_path),
            "--ckpt_path",
            str(fitted_run / "checkpoints" / "last.ckpt"),
        ]
    )
    out = capsys.readouterr().out
    assert "val/loss" in out


def test_qlora_nf4_trains_on_cpu_with_finite_loss_and_changing_lora(tmp_path: Path) -> None:
    seed_everything(0)
    module = TutorModule(model_config=dict(TINY_PHI), quantization="nf4-double", lora_r=4, learning_rate=0.01)
    data = MathDataModule(
        source="synthetic",
        batch_size=8,
        max_length=128,
        synthetic=SyntheticSpec(train_size=32, val_size=8, test_size=8),
        tokenizer_name_or_path=str(bundled_tokenizer_dir()),
    )
    module.configure_model()
    quantized = [n for n, p in module.model.named_parameters() if p.dtype == torch.uint8]
    assert quantized and all("base_layer" in n for n in quantized)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in before.values())
    trainer = Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    after = dict(module.model.named_parameters())
    changed = [n for n, p in before.items() if "lora_B" in n and not torch.equal(p, after[n])]
    assert len(changed) == 6 * TINY_PHI["num_hidden_layers"]


def test_answer_only_loss_matches_transformers_full_logits_loss() -> None:
    """The memory-saving loss (LM head on answer positions only) equals transformers' own."""
    module = TutorModule(model_config=dict(TINY_PHI), lora_r=4, lora_dropout=0.0)
    module.configure_model()
    torch.manual_seed(0)
    for parameter in module.trainable_parameters():  # make LoRA non-zero so its gradients matter
        torch.nn.init.normal_(parameter, std=0.05)
    input_ids = torch.randint(0, 512, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[attention_mask == 0] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    ours = module.target_token_loss(batch)
    ours.backward()
    ours_grads = [p.grad.clone() for p in module.trainable_parameters()]
    module.model.zero_grad()
    reference = module.model(**batch).loss
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for ours_grad, parameter in zip(ours_grads, module.trainable_parameters()):
        torch.testing.assert_close(ours_grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_generate_returns_only_new_text_in_question_order() -> None:
    module = TutorModule(model_config=dict(TINY_PHI), lora_r=4, max_new_tokens=6)
    module.configure_model()
    questions = [
        "Ana has 3 apples. How many?",
        "Tom buys 12 pens and 7 more. How many pens does he have?",
        "Hi",
    ]
    batched = module.generate(questions, batch_size=3)
    one_by_one = [module.generate([q], batch_size=1)[0] for q in questions]
    assert batched == one_by_one  # left padding does not change greedy answers
    assert all("Instruct:" not in answer for answer in batched)


def test_generate_applies_the_callers_logits_processor_to_every_batch() -> None:
    module = TutorModule(model_config=dict(TINY_PHI), lora_r=4, max_new_tokens=3)
    module.configure_model()
    rows_seen: list[int] = []

    def record_rows(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows_seen.append(input_ids.shape[0])
        return scores

    module.generate(
        ["Hi", "Ana has 3 apples.", "Tom buys 12 pens."],
        batch_size=1,
        logits_processor=[record_rows],
        min_new_tokens=3,  # no early EOS: three new tokens in each batch
    )
    assert rows_seen == [1] * 9  # three batches of one row, three new tokens each
