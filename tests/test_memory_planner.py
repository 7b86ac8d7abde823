"""The memory planner against real tensors: weights (quantized and not), LoRA, optimizer states and
saved activations of tiny Phi models and of Phi-2's shape; `plan` on the 4 GB config."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from phi2tutor.errors import Phi2TutorError
from phi2tutor.memory import (
    KNOWN_MODEL_CONFIGS,
    MB,
    base_weight_breakdown,
    estimate_memory,
    estimate_settings,
    format_breakdown_table,
    load_model_config,
    lora_parameter_shapes,
    main_plan,
    max_micro_batch_that_fits,
    model_shape,
    optimizer_state_bytes,
    plan_from_config_dict,
    quantized_linear_bytes,
)
from phi2tutor.memory.tracker import (
    LiveTensorBytes,
    frozen_model_tensors,
    optimizer_state_tensors,
    storage_bytes,
)
from phi2tutor.phi2 import PHI2_LORA_TARGETS
from tests.conftest import REPO, tiny_config, write_yaml

# Odd sizes on purpose: 96*96/64 = 144 absmax blocks (a partial second-level block of 256).
SMALL_PHI = {
    "vocab_size": 1000,
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "partial_rotary_factor": 0.5,
}
# LoRA tensors on both sides of bitsandbytes' 4096-element line between 32-bit and 8-bit state.
OPTIMIZER_PHI = {**SMALL_PHI, "hidden_size": 256, "intermediate_size": 1024}
PHI2_CONFIG = REPO / "configs" / "phi2-qlora-4gb.yaml"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def tiny_saved_model(tmp_path: Path, shape: dict) -> Path:
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    directory = tmp_path / "tiny-phi"
    PhiForCausalLM(PhiConfig(**shape)).save_pretrained(directory)
    return directory


def load_like_phi2(directory: Path, quantization: str, compute_dtype: str, attention: str = "eager"):
    """from_pretrained with the project's BitsAndBytesConfig: the path a hub id like Phi-2 takes."""
    from transformers import PhiForCausalLM

    from phi2tutor.loading import quantization_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PhiForCausalLM.from_pretrained(
            directory,
            dtype=DTYPES[compute_dtype],
            quantization_config=quantization_config(quantization, compute_dtype),
            attn_implementation=attention,
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def with_lora(model, r: int, targets=PHI2_LORA_TARGETS):
    """peft LoRA as phi2tutor.loading.wrap_with_lora makes it: trainable weights in fp32."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=list(targets), lora_dropout=0.0))
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return peft_model


# --------------------------------------------------------------------------- model config
def test_phi2_shape_is_known_offline() -> None:
    config = load_model_config("microsoft/phi-2", None)
    shape = model_shape(config)
    assert (shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers) == (2560, 10240, 32)
    assert (shape.num_attention_heads, shape.vocab_size, shape.max_position_embeddings) == (32, 51200, 2048)
    assert shape.partial_rotary_factor == pytest.approx(0.4)
    assert shape.rotary_dim == 32  # head 80 x 0.4


def test_config_from_yaml_dict_and_local_directory(tmp_path: Path) -> None:
    from transformers import PhiConfig

    from_dict = model_shape(load_model_config("ignored/when-a-config-is-given", SMALL_PHI))
    PhiConfig(**SMALL_PHI).save_pretrained(tmp_path / "local")
    from_dir = model_shape(load_model_config(str(tmp_path / "local"), None))
    assert from_dict == from_dir
    assert (from_dir.hidden_size, from_dir.rotary_dim, from_dir.intermediate_size) == (96, 12, 384)
    with pytest.raises(Phi2TutorError, match="model_config"):
        load_model_config("nobody/no-such-model-xyz", None)


# --------------------------------------------------------------------------- weights
@pytest.mark.parametrize(
    ("quantization", "compute_dtype"),
    [
        ("none", "float32"),
        ("none", "float16"),
        ("nf4", "float16"),
        ("nf4-double", "float16"),
        ("int8", "float16"),
    ],
)
def test_weight_bytes_equal_the_loaded_tensors(tmp_path: Path, quantization: str, compute_dtype: str) -> None:
    model = load_like_phi2(tiny_saved_model(tmp_path, SMALL_PHI), quantization, compute_dtype)
    planned = base_weight_breakdown(SMALL_PHI, quantization, compute_dtype)
    assert sum(nbytes for _, nbytes in planned) == storage_bytes(frozen_model_tensors(model))
    # lm_head stays unquantized in the compute dtype; only decoder linears are bitsandbytes layers
    assert model.lm_head.weight.dtype == DTYPES[compute_dtype]
    if quantization != "none":
        assert model.model.layers[0].mlp.fc1.weight.dtype in (torch.uint8, torch.int8)


@pytest.mark.parametrize("quantization", ["nf4", "nf4-double"])
def test_phi2_linear_layers_quantize_to_the_planned_bytes(quantization: str) -> None:
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    for out_features, in_features in [(2560, 2560), (10240, 2560)]:  # attention; fc1 (fc2 transposed)
        weight = torch.randn(out_features, in_features, dtype=torch.float16)
        packed, state = bnbf.quantize_4bit(
            weight, blocksize=64, compress_statistics=quantization == "nf4-double", quant_type="nf4"
        )
        tensors = [state.absmax, state.code]
        if state.state2 is not None:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        planned = quantized_linear_bytes(out_features, in_features, quantization)
        assert planned["weight"] == packed.numel() * packed.element_size()
        assert planned["quant_state"] == sum(t.numel() * t.element_size() for t in tensors)


def test_phi2_shaped_meta_model_weights_and_lora_match_the_plan() -> None:
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(**KNOWN_MODEL_CONFIGS["microsoft/phi-2"])
    with torch.device("meta"):
        model = PhiForCausalLM._from_config(config, dtype=torch.float16)
    assert tensor_bytes_meta(model) == sum(nb for _, nb in base_weight_breakdown(config, "none", "float16"))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    lora = [p for p in with_lora(model, r=16).parameters() if p.requires_grad]
    assert sorted(tuple(p.shape) for p in lora) == sorted(lora_parameter_shapes(config, 16))
    estimate = estimate_memory(config, lora_r=16)
    assert estimate.trainable_parameter_count == sum(p.numel() for p in lora) == 23_592_960
    assert estimate.trainable_parameter_bytes == sum(p.numel() * p.element_size() for p in lora)
    assert estimate.gradient_bytes == estimate.trainable_parameter_bytes  # fp32 grads, same shapes


def tensor_bytes_meta(model) -> int:
    # meta tensors have no storage to deduplicate; Phi-2 ties nothing.
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# --------------------------------------------------------------------------- optimizer states
def optimizer_states_after_one_step(parameters, optimizer: str) -> int:
    import bitsandbytes as bnb

    if optimizer == "adamw":
        opt = torch.optim.AdamW(parameters, lr=1e-3)
    else:
        opt_class = bnb.optim.PagedAdamW8bit if optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
        opt = opt_class(parameters, lr=1e-3)
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        opt.step()
    return storage_bytes(optimizer_state_tensors(opt))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_optimizer_state_bytes_equal_the_real_states(tmp_path: Path, optimizer: str) -> None:
    model = with_lora(load_like_phi2(tiny_saved_model(tmp_path, OPTIMIZER_PHI), "nf4-double", "float16"), r=8)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert {p.numel() < 4096 for p in lora} == {True, False}  # both 32-bit and 8-bit states occur
    allocated, paged = optimizer_state_bytes([p.numel() for p in lora], optimizer)
    assert paged == 0  # no tensor of a tiny model reaches the 100k elements that get paged
    assert allocated == optimizer_states_after_one_step(lora, optimizer)
    estimate = estimate_memory(OPTIMIZER_PHI, lora_r=8, optimizer=optimizer)
    assert estimate.optimizer_state_bytes == allocated


def test_phi2_lora_optimizer_states_equal_real_states_and_split_paged() -> None:
    """One layer of Phi-2's LoRA tensors, real; every layer has the same shapes."""
    shapes = lora_parameter_shapes(KNOWN_MODEL_CONFIGS["microsoft/phi-2"], 16)
    layers = KNOWN_MODEL_CONFIGS["microsoft/phi-2"]["num_hidden_layers"]
    one_layer = [torch.zeros(shape, requires_grad=True) for shape in shapes[: len(shapes) // layers]]
    maps = 2 * 256 * 4  # the optimizer's two shared quantization maps, counted once
    real_one_layer = optimizer_states_after_one_step(one_layer, "adamw8bit")
    allocated, paged = optimizer_state_bytes([math.prod(s) for s in shapes], "paged_adamw8bit")
    assert allocated + paged == (real_one_layer - maps) * layers + maps
    # fc1's B (10240x16) and fc2's A (16x10240) reach 100k elements: their uint8 states are paged
    assert paged == layers * 2 * (2 * 10240 * 16)


# --------------------------------------------------------------------------- activations
def saved_tensor_bytes(model, run) -> int:
    """Bytes of distinct tensors autograd saves for backward while ``run`` runs, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in weights and (tensor.is_floating_point() or tensor.dtype == torch.bool):
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


@pytest.mark.parametrize(
    ("quantization", "compute_dtype", "targets"),
    [
        ("nf4-double", "float32", PHI2_LORA_TARGETS),
        ("none", "float32", PHI2_LORA_TARGETS),
        ("nf4-double", "float16", PHI2_LORA_TARGETS),
        ("nf4", "float32", ("dense", "fc2")),  # the first layer's attention then needs no gradient
    ],
)
def test_saved_activations_equal_what_autograd_keeps(
    tmp_path: Path, quantization: str, compute_dtype: str, targets: tuple[str, ...]
) -> None:
    """Decoder + final layer norm of a real peft model, no checkpointing, 32-true (no autocast)."""
    model = with_lora(
        load_like_phi2(tiny_saved_model(tmp_path, SMALL_PHI), quantization, compute_dtype), 4, targets
    )
    model.train()  # as in fit (bitsandbytes repacks 4-bit weights for CPU inference in eval mode)
    batch, seq = 2, 24
    input_ids = torch.randint(0, SMALL_PHI["vocab_size"], (batch, seq))
    decoder = model.get_base_model().model
    measured = saved_tensor_bytes(
        model,
        lambda: decoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False),
    )
    estimate = estimate_memory(
        SMALL_PHI,
        quantization=quantization,
        compute_dtype=compute_dtype,
        precision="32-true",
        lora_r=4,
        lora_target_modules=targets,
        lora_dropout=0.0,
        optimizer="adamw",
        micro_batch=batch,
        max_length=seq,
        gradient_checkpointing=False,
        attention="eager",
    )
    kept = estimate.phases["loss backward"]
    planned = sum(
        nb for name, nb in kept if name.startswith(("activations of", "rotary cos", "final layernorm"))
    )
    planned -= seq * 8  # the int64 position ids the planner counts with cos/sin: held, not saved by autograd
    if compute_dtype == "float16":
        # The CPU's layer_norm keeps mean/rstd in fp16; CUDA (the planned device) keeps fp32.
        layer_norms_with_grad = SMALL_PHI["num_hidden_layers"]  # layers 1.. and the final norm
        planned -= layer_norms_with_grad * batch * seq * 2 * (4 - 2)
    assert measured == planned


# --------------------------------------------------------------------------- the estimate
def test_estimate_orders_configurations_as_expected() -> None:
    phi2 = KNOWN_MODEL_CONFIGS["microsoft/phi-2"]
    peak = {
        q: estimate_memory(phi2, quantization=q).estimated_peak_allocated_mb
        for q in ("nf4-double", "nf4", "int8", "none")
    }
    assert peak["nf4-double"] < peak["nf4"] < peak["int8"] < peak["none"]
    with_checkpointing = estimate_memory(phi2).estimated_peak_allocated_mb
    without = estimate_memory(phi2, gradient_checkpointing=False).estimated_peak_allocated_mb
    assert without > with_checkpointing + 2000  # every layer's activations: several GB on Phi-2
    assert estimate_memory(phi2, optimizer="adamw").optimizer_state_bytes == 2 * 4 * 23_592_960
    chunked = estimate_memory(phi2, loss_chunk_tokens=64)
    assert chunked.estimated_peak_allocated_mb <= with_checkpointing
    settings = estimate_settings(estimate_memory(phi2, model_name="microsoft/phi-2"))
    best = max_micro_batch_that_fits(phi2, 4096, **settings)
    assert best >= 1
    assert estimate_memory(phi2, **{**settings, "micro_batch": best}).fits(4096)
    assert not estimate_memory(phi2, **{**settings, "micro_batch": best + 1}).fits(4096)


def test_plan_json_on_the_4gb_config_fits_4096(capsys) -> None:
    assert main_plan(["--config", str(PHI2_CONFIG), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget_mb"] == 4096 and plan["fits"] is True
    assert plan["max_micro_batch"] >= 1
    assert plan["estimated_peak_allocated_mb"] <= 2500  # vs the reference run's 3087 MB
    assert plan["estimated_peak_mb"] > plan["estimated_peak_allocated_mb"] + 300  # + CUDA context
    assert sum(row["bytes"] for row in plan["breakdown"]) / MB == pytest.approx(
        plan["estimated_peak_allocated_mb"], abs=0.01
    )
    names = " ".join(row["name"] for row in plan["breakdown"])
    for term in ("nf4-double", "embed_tokens", "lm_head", "LoRA weights", "optimizer states", "gradients"):
        assert term in names
    assert plan["settings"]["attention"] == "phi2tutor_fp32_scores"  # TutorModule's fp16 default


def test_plan_table_and_budget(capsys) -> None:
    assert main_plan(["--config", str(PHI2_CONFIG), "--budget_mb", "2048"]) == 0
    table = capsys.readouterr().out
    assert "DOES NOT FIT" in table and "Budget 2048 MB" in table and "Largest micro-batch" in table


@pytest.mark.parametrize("budget", ["-5", "0"])
def test_plan_rejects_a_budget_that_is_not_positive(budget: str) -> None:
    with pytest.raises(Phi2TutorError, match=rf"--budget_mb {budget}: a memory budget must be a positive"):
        main_plan(["--config", str(PHI2_CONFIG), "--budget_mb", budget])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"quantization": "nf3"}, "quantization"),
        ({"lora_rank": 4}, "lora_rank"),  # fit rejects keys TutorModule does not have; so does plan
        ({"loss_token_fraction": 0.5}, "loss_token_fraction"),
    ],
)
def test_plan_rejects_what_fit_rejects(tmp_path: Path, capsys, model: dict, message: str) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", {"model": {"model_config": SMALL_PHI, **model}})
    with pytest.raises(SystemExit) as exit_info:
        main_plan(["--config", str(bad)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_without_a_model_section_plans_phi2_under_its_name(tmp_path: Path, capsys) -> None:
    config = write_yaml(tmp_path / "data-only.yaml", {"data": {"batch_size": 1, "max_length": 256}})
    assert main_plan(["--config", str(config), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model_name"] == "microsoft/phi-2"
    assert plan["model"]["hidden_size"] == 2560 and plan["settings"]["max_length"] == 256
    assert plan["budget_mb"] == 4096  # no GPUMemoryProfiler in the config: the default budget


def test_plan_gives_fits_estimate_with_overrides_and_linked_arguments(tmp_path: Path, capsys) -> None:
    """`plan` and `fit` on the same config and command-line overrides: the same estimate, the same budget."""
    from phi2tutor.cli import main
    from phi2tutor.memory.plan_command import parse_fit_config

    config = tiny_config(
        tmp_path,
        trainer={
            "max_steps": 1,
            "limit_val_batches": 0,
            "callbacks": [
                {"class_path": "callbacks.memory.GPUMemoryProfiler", "init_args": {"budget_mb": 512}}
            ],
        },
    )
    path = write_yaml(tmp_path / "fit.yaml", config)
    overrides = [
        "--data.batch_size", "3",
        "--model.lora_r", "2",
        "--trainer.accumulate_grad_batches", "2",
        "--data.prompt_template", "Q: {question}\nA:",
    ]  # fmt: skip
    assert main_plan(["--config", str(path), "--json", *overrides]) == 0
    plan = json.loads(capsys.readouterr().out)
    model, data, _ = parse_fit_config(["--config", str(path), *overrides])
    assert model.hparams.prompt_template == data.hparams.prompt_template == "Q: {question}\nA:"  # linked
    main(["fit", "--config", str(path), *overrides])
    run_dir = max((tmp_path / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
    fitted = json.loads((run_dir / "memory.json").read_text())["estimate"]
    assert plan["settings"]["micro_batch"] == 3 and plan["settings"]["lora_r"] == 2
    assert plan["settings"]["accumulate_grad_batches"] == 2
    assert plan["budget_mb"] == 512  # the profiler's budget in the config
    plan.pop("max_micro_batch")
    assert plan.pop("budget_from") == "GPUMemoryProfiler.budget_mb"
    assert (
        plan.pop("auto_micro_batch")["batch_size_is_auto"] is False
    )  # what auto would pick (test_micro_batch)
    assert plan == fitted


def test_plan_from_lightning_cli_style_config() -> None:
    config = {
        "trainer": {"precision": "16-mixed", "accumulate_grad_batches": 4},
        "model": {
            "class_path": "phi2tutor.model.TutorModule",
            "init_args": {"model_config": SMALL_PHI, "lora_r": 4},
        },
        "data": {"init_args": {"batch_size": 3, "max_length": 40}},
    }
    estimate = plan_from_config_dict(config)
    assert estimate.settings["micro_batch"] == 3 and estimate.settings["max_length"] == 40
    assert (
        estimate.settings["quantization"] == "none"
        and estimate.settings["attention"] == "phi2tutor_fp32_scores"
    )
    assert any("kept across accumulated micro-batches" in name for name, _ in estimate.breakdown)
    assert "Peak of a training step" in format_breakdown_table(estimate, 4096)


# --------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_is_close_to_measured_peak_on_gpu(tmp_path: Path) -> None:
    """A real QLoRA fit of a small Phi on the GPU: max_memory_allocated within 20% of the plan."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from callbacks.memory import GPUMemoryProfiler
    from phi2tutor.model import TutorModule

    shape = {
        **SMALL_PHI,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "vocab_size": 2048,
    }
    batch, seq = 4, 512
    ids = torch.randint(0, shape["vocab_size"], (32, seq))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    module = TutorModule(
        model_config=shape,
        quantization="nf4-double",
        compute_dtype="float16",
        lora_r=8,
        gradient_checkpointing=True,
        optimizer="paged_adamw8bit",
    )
    module.memory_estimate = estimate_memory(
        shape, lora_r=8, micro_batch=batch, max_length=seq, loss_token_fraction=(seq - 1) / seq
    )
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision="16-mixed",
        max_steps=4,
        default_root_dir=tmp_path,
        callbacks=[GPUMemoryProfiler(every_n_steps=1)],
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, DataLoader(rows, batch_size=batch))
    record = json.loads((Path(trainer.log_dir) / "memory.json").read_text())
    measured = record["max_allocated_mb"]
    assert measured == pytest.approx(module.memory_estimate.estimated_peak_allocated_mb, rel=0.2)


# --------------------------------------------------------------------------- term functions vs tracked bytes
def test_kept_activation_terms_equal_the_tracked_live_bytes_after_a_checkpointed_forward(
    tmp_path: Path,
) -> None:
    """After the decoder's forward with gradient checkpointing, what stays alive (counted by the live-tensor
    tracker) is exactly the planner's kept activations, final-norm and last-hidden-state terms."""
    shape = {**SMALL_PHI, "resid_pdrop": 0.0}
    model = load_like_phi2(tiny_saved_model(tmp_path, shape), "nf4-double", "float32")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = with_lora(model, r=4)
    model.train()
    batch, seq = 2, 24
    input_ids = torch.randint(0, shape["vocab_size"], (batch, seq))
    weights = [*model.parameters(), *model.buffers()]
    tracker = LiveTensorBytes(baseline=weights)
    with tracker:
        hidden = (
            model.get_base_model()
            .model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
            .last_hidden_state
        )
    live = tracker.live_bytes
    estimate = estimate_memory(
        shape,
        quantization="nf4-double",
        compute_dtype="float32",
        precision="32-true",
        lora_r=4,
        lora_dropout=0.0,
        optimizer="adamw",
        micro_batch=batch,
        max_length=seq,
        gradient_checkpointing=True,
        attention="eager",
    )
    groups = dict(estimate.phase_groups["loss forward"])
    planned = sum(
        nb for name in ("kept_activations", "final_norm_kept", "head_forward") for _, nb in groups[name]
    )
    assert hidden.requires_grad
    assert live == planned
    # the term functions' parts: one checkpointed input per layer, fp32 (no autocast)
    kept = dict(groups["kept_activations"])
    assert kept["checkpointed decoder layer inputs"] == shape["num_hidden_layers"] * batch * seq * 96 * 4
