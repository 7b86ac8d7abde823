"""Loading of tokenizer, base model (hub id, local directory or a PhiConfig), bitsandbytes
quantization and the peft LoRA wrapper. TutorModule calls these; benchmarks and tests may too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from phi2tutor.errors import Phi2TutorError, first_line
from phi2tutor.phi2 import PHI2_LORA_TARGETS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bundled_tokenizer_dir() -> Path:
    return Path(__file__).parent / "assets" / "tokenizer"


def tokenizer_source(
    tokenizer_name_or_path: str | None, model_name_or_path: str, model_config: dict | None
) -> str:
    """Where the tokenizer comes from, decided here only (the CLI links the data module's tokenizer to it):
    the explicit tokenizer, else the bundled one for a model built from ``model_config``, else the model's."""
    if tokenizer_name_or_path:
        return tokenizer_name_or_path
    if model_config is not None:
        return str(bundled_tokenizer_dir())
    return model_name_or_path


def load_tokenizer(tokenizer_name_or_path: str | None, model_name_or_path: str, model_config: dict | None):
    """The tokenizer, padding with EOS (Phi-2 has no pad token; labels are masked by attention mask)."""
    from transformers import AutoTokenizer

    source = tokenizer_source(tokenizer_name_or_path, model_name_or_path, model_config)
    _check_local_source(source, "tokenizer", "model.tokenizer_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise Phi2TutorError(
            f"Could not load a tokenizer: {_where(source, 'tokenizer files')} ({_first_line(error)}) Give "
            "model.tokenizer_name_or_path as a local directory with tokenizer.json, or a hub id on a machine "
            "that can reach the hub."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _looks_like_path(source: str) -> bool:
    """A local path rather than a hub id ("owner/name"): absolute, relative with ./ or ../, ~, or more than
    one slash; hub ids have at most one."""
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or source in (".", "..")


def _where(source: str, what: str) -> str:
    """Why ``source`` gave nothing, in the user's terms: a directory without the files, or neither a
    local directory nor something the hub could give."""
    if Path(source).expanduser().is_dir():
        return f"the directory {source!r} holds no {what}"
    return f"{source!r} is no local directory (relative to {Path.cwd()}) and the hub did not give it"


def _check_local_source(source: str, what: str, option: str) -> None:
    """A local directory that is not there is a wrong path, not "a bad hub id": say so."""
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise Phi2TutorError(
            f"{option} {source!r} is a file; the {what} is loaded from a directory (config.json, the weights "
            "and tokenizer files) or a hub id."
        )
    if not path.exists() and _looks_like_path(source):
        raise Phi2TutorError(
            f"{option} {source!r} is a local path, and no directory exists there (relative paths start from "
            f"{Path.cwd()}). Check the path, or give a hub id such as microsoft/phi-2."
        )


# What from_pretrained reads: config and tokenizer files, safetensors weights (Phi-2's hub repo has both
# .safetensors and .bin copies; downloading only one halves the download).
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py"]


def download_from_hub(source: str, what: str, option: str) -> None:
    """Fetch a hub model into the local hub cache (nothing for a local directory), so that the later
    from_pretrained of every process reads the cache. TutorModule.prepare_data calls it: Lightning runs
    that once per node, before any process loads the model.

    Raises:
        Phi2TutorError: the hub cannot be reached or has no such repository.
    """
    if Path(source).expanduser().exists() or _looks_like_path(source):
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source, allow_patterns=HUB_FILE_PATTERNS)
    except Exception as error:  # huggingface_hub raises many types for "not reachable" and "no such repo"
        raise Phi2TutorError(
            f"Could not download the {what} {source!r}: it is no local directory (relative to {Path.cwd()}) "
            f"and the hub did not give it ({_first_line(error)}) Give {option} as a local directory, or a hub "
            "id on a machine that can reach the hub."
        ) from None


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
    _check_local_source(source, "base model", "model.model_name_or_path")
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
            f"Could not load the base model: {_where(source, 'complete model')} ({_first_line(error)}) Give model.model_name_or_path "
            "as a local directory holding config.json and the weights, or a hub id on a machine that can "
            "reach the hub (or set model.model_config to build a small model)."
        ) from None
    except Exception as error:
        if not _is_file_content_error(error):
            raise
        raise Phi2TutorError(
            f"The base model in {source!r} could not be read: {_first_line(error)} Its config.json or weight "
            "files are damaged or incomplete (an interrupted download?): download or copy it again."
        ) from None


def _is_file_content_error(error: BaseException) -> bool:
    """A damaged or foreign weights/config file (safetensors header, JSON, size mismatch), as opposed to a bug."""
    name = type(error).__name__
    return (
        name in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "JSONDecodeError")
        or isinstance(error, (EOFError, UnicodeDecodeError))
        or (isinstance(error, (RuntimeError, ValueError)) and "size mismatch" in str(error))
    )


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
    from peft import LoraConfig, get_peft_model

    if adapter_path is not None:
        if not (Path(adapter_path) / "adapter_config.json").is_file():
            raise Phi2TutorError(
                f"model.adapter_path {adapter_path!r} holds no adapter_config.json. Point it at a directory "
                "written when a phi2tutor fit ended (lightning_logs/version_N/adapter or adapter_output_dir)."
            )
        model = load_adapter(base, adapter_path)
    else:
        missing = [
            m for m in target_modules if not any(n.split(".")[-1] == m for n, _ in base.named_modules())
        ]
        if missing:
            raise Phi2TutorError(
                f"model.lora_target_modules names {missing}, which the base model does not have. Phi-2's "
                f"linear layers are {', '.join(PHI2_LORA_TARGETS)}."
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


def load_adapter(base: torch.nn.Module, adapter_path: str):
    """peft's PeftModel.from_pretrained (trainable), with a clear message for an adapter of another base or
    damaged files instead of peft's and safetensors' tracebacks."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
    except Exception as error:
        if "size mismatch" in str(error):
            detail = str(error).split("size mismatch for ", 1)[-1].splitlines()[0].strip()
            raise Phi2TutorError(
                f"The adapter in {adapter_path} was trained on another base model: its weights do not fit "
                f"this one (size mismatch for {detail[:200]}). Use the base model (model.model_name_or_path or "
                "model.model_config) the adapter was trained with; its adapter_config.json names it "
                "(base_model_name_or_path)."
            ) from None
        if not _is_file_content_error(error) and not isinstance(error, (OSError, ValueError, KeyError)):
            raise
        raise Phi2TutorError(
            f"The adapter in {adapter_path} could not be read: {_first_line(error)} Its adapter_config.json or "
            "adapter_model.safetensors is damaged or incomplete: copy it again from the run directory "
            "(lightning_logs/version_N/adapter) or from a checkpoint."
        ) from None


def _first_line(error: BaseException) -> str:
    return first_line(error).rstrip(".") + "."


def check_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Stop with one clear message when ``path`` is not a readable Lightning checkpoint: truncated (an
    interrupted copy or save), empty, or some other torch file. Cheap: the tensors are memory-mapped,
    not read.

    Returns:
        The checkpoint (tensors memory-mapped), or None for a readable file holding objects outside torch's
        weights-only allowlist (Lightning decides what to do with it).

    Raises:
        Phi2TutorError: the file is damaged or is not a Lightning checkpoint.
    """
    import pickle

    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as error:
        if "Weights only load failed" in str(error):
            return None  # a readable file with objects outside torch's allowlist: Lightning decides
        size = path.stat().st_size if path.exists() else 0
        # torch's text for an empty file talks about mmap and zip serialization: no help to the user.
        said = "" if size == 0 else f" (torch: {first_line(error).split('. ')[0].rstrip('.')})"
        state = "empty (0 bytes)" if size == 0 else f"truncated or damaged ({size:,} bytes)"
        raise Phi2TutorError(
            f"The checkpoint {path} cannot be read: the file is {state}{said}. It was "
            "probably cut short by an interrupted save or copy. Use another checkpoint of the run (the "
            "checkpoints/ directory keeps the last and the best ones) or copy it again."
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "pytorch-lightning_version" not in checkpoint
    ):
        keys = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise Phi2TutorError(
            f"{path} is a torch file but not a Lightning checkpoint (it has no 'state_dict' and "
            f"'pytorch-lightning_version'; found {keys}). Give --ckpt_path a .ckpt written by phi2tutor fit "
            "(lightning_logs/version_N/checkpoints/); for a saved adapter use --model.adapter_path instead."
        )
    return checkpoint
