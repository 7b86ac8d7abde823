"""Loading of tokenizer, base model (hub id, local directory or a PhiConfig), bitsandbytes
quantization and the peft LoRA wrapper. TutorModule calls these; benchmarks and tests may too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from phi2tutor.errors import Phi2TutorError, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bundled_tokenizer_dir() -> Path:
    return Path(__file__).parent / "assets" / "tokenizer"


def load_tokenizer(tokenizer_name_or_path: str | None, model_name_or_path: str, model_config: dict | None):
    """The tokenizer, padding with EOS (Phi-2 has no pad token; labels are masked by attention mask)."""
    from transformers import AutoTokenizer

    source = tokenizer_name_or_path
    if source is None:
        source = str(bundled_tokenizer_dir()) if model_config is not None else model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise Phi2TutorError(
            f"Could not load a tokenizer from {source!r}: {_first_line(error)} Give model.tokenizer_name_or_path "
            "as a local directory with tokenizer.json, or a hub id on a machine that can reach the hub."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quantization: str, compute_dtype: str):
    """transformers' BitsAndBytesConfig for ``quantization``, or None for unquantized weights."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quantization == "nf4-double",
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )


def load_base_model(
    model_name_or_path: str,
    model_config: dict[str, Any] | None,
    quantization: str,
    compute_dtype: str,
    attn_implementation: str,
    trust_remote_code: bool = False,
    init_seed: int = 0,
) -> torch.nn.Module:
    """Frozen base: from a hub id / local directory, or a seeded PhiForCausalLM built from ``model_config``."""
    from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM

    dtype = DTYPES[compute_dtype]
    if model_config is not None:
        try:
            config = PhiConfig(**model_config)
        except (TypeError, ValueError) as error:
            raise Phi2TutorError(f"model.model_config is not a valid PhiConfig: {error}") from None
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            model = PhiForCausalLM(config)
        if quantization == "none":
            model = model.to(dtype)
            model.config._attn_implementation = attn_implementation
        else:
            # bitsandbytes quantizes on load: go through the same from_pretrained path as Phi-2.
            with tempfile.TemporaryDirectory() as directory:
                # Written by hand: save_pretrained writes only on rank zero, and every DDP process
                # needs its own copy to load.
                from safetensors.torch import save_model

                model.config.save_pretrained(directory)
                save_model(model, str(Path(directory) / "model.safetensors"))
                model = _from_pretrained(
                    AutoModelForCausalLM,
                    directory,
                    dtype,
                    quantization,
                    compute_dtype,
                    attn_implementation,
                    False,
                )
    else:
        model = _from_pretrained(
            AutoModelForCausalLM,
            model_name_or_path,
            dtype,
            quantization,
            compute_dtype,
            attn_implementation,
            trust_remote_code,
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _from_pretrained(cls, source, dtype, quantization, compute_dtype, attn_implementation, trust_remote_code):
    try:
        return cls.from_pretrained(
            source,
            dtype=dtype,
            quantization_config=quantization_config(quantization, compute_dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except OSError as error:
        raise Phi2TutorError(
            f"Could not load the base model {source!r}: {_first_line(error)} Give model.model_name_or_path "
            "as a local directory holding config.json and the weights, or a hub id on a machine that can "
            "reach the hub (or set model.model_config to build a small model)."
        ) from None


def wrap_with_lora(
    base: torch.nn.Module,
    adapter_path: str | None,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    modules_to_save: list[str] | None,
):
    """peft LoRA around ``base``: a fresh adapter, or a saved one (trainable) from ``adapter_path``.

    Trainable weights end up in fp32 (16-mixed's GradScaler cannot unscale fp16 gradients); the
    frozen embeddings and lm_head keep the base dtype (peft's prepare_model_for_kbit_training would
    upcast them to fp32: ~0.5 GB on Phi-2).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path is not None:
        if not (Path(adapter_path) / "adapter_config.json").is_file():
            raise Phi2TutorError(
                f"model.adapter_path {adapter_path!r} holds no adapter_config.json. Point it at a directory "
                "written when a phi2tutor fit ended (lightning_logs/version_N/adapter or adapter_output_dir)."
            )
        model = PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
    else:
        missing = [
            m for m in target_modules if not any(n.split(".")[-1] == m for n, _ in base.named_modules())
        ]
        if missing:
            raise Phi2TutorError(
                f"model.lora_target_modules names {missing}, which the base model does not have. Phi-2's "
                "linear layers are q_proj, k_proj, v_proj, dense, fc1 and fc2."
            )
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def _first_line(error: BaseException) -> str:
    return first_line(error).rstrip(".") + "."
