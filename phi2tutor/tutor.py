"""A trained tutor, rebuilt from what its run saved: the one loader that chat, serve and export share,
the generation settings they expose (greedy by default), and streaming of one answer.

A run directory (lightning_logs/version_N) or an adapter directory (models/NAME) both work: the settings
come from ``phi2tutor_adapter.json`` beside the adapter (written by TutorModule.save_adapter), else from the
run's config.yaml, else from peft's adapter_config.json; options given by the user override them.
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi2tutor.errors import Phi2TutorError, first_line
from phi2tutor.keys import ADAPTER_DIR, CONFIG_YAML, TUTOR_SETTINGS_JSON

if TYPE_CHECKING:
    from phi2tutor.model import TutorModule

SETTINGS_VERSION = 1
# Settings of the run that say nothing about how to rebuild the tutor from a saved adapter.
_NOT_SAVED = ("adapter_path", "adapter_output_dir")
# Options every tutor command accepts, as (name, type, help): they override the saved settings.
OVERRIDE_OPTIONS = (
    ("model_name_or_path", str, "base model (hub id or directory) instead of the one the run used"),
    ("tokenizer_name_or_path", str, "tokenizer instead of the one the run used"),
    ("quantization", str, "none, nf4, nf4-double or int8 instead of the run's (4-bit needs bitsandbytes)"),
    ("compute_dtype", str, "float32, float16 or bfloat16 instead of the run's"),
    ("prompt_template", str, "prompt with a {question} field instead of the run's"),
)


def write_tutor_settings(directory: str | Path, hparams: Mapping[str, Any]) -> Path:
    """Write ``phi2tutor_adapter.json`` into ``directory``: the TutorModule settings of the run (base model,
    tokenizer, prompt template, quantization, compute dtype, LoRA settings and any other hyperparameter,
    such as the calculator), so the adapter directory alone rebuilds the tutor."""
    # "_instantiator" and the like are LightningCLI's bookkeeping, not the tutor's settings.
    settings = {k: v for k, v in hparams.items() if k not in _NOT_SAVED and not k.startswith("_")}
    base = settings.get("model_name_or_path")
    if settings.get("model_config") is None and base and Path(base).is_dir():
        # A relative local base only resolves from the training's working directory; keep where it was too.
        settings["model_path_resolved"] = str(Path(base).resolve())
    path = Path(directory) / TUTOR_SETTINGS_JSON
    payload = {"phi2tutor_settings_version": SETTINGS_VERSION, "tutor": settings}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def read_tutor_settings(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The settings ``write_tutor_settings`` left in ``adapter_dir`` (None when it has no such file)."""
    path = Path(adapter_dir) / TUTOR_SETTINGS_JSON
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["tutor"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Phi2TutorError(
            f"{path} is not a phi2tutor settings file ({first_line(error)}). It is written when fit saves "
            "the adapter; delete it to fall back on the run's config.yaml (or set model.calculator)."
        ) from None


@dataclass
class TutorSource:
    """Where a tutor's adapter is, its run directory when it has one, and its saved settings."""

    adapter_dir: Path
    run_dir: Path | None
    settings: dict[str, Any]
    settings_from: str


def locate_tutor(path: str | Path) -> TutorSource:
    """Find the adapter and the settings of ``path``: a run directory or an adapter directory."""
    path = Path(path)
    if not path.exists():
        raise Phi2TutorError(
            f"{str(path)!r} does not exist. Give a run directory (lightning_logs/version_N) or an adapter "
            "directory (the model.adapter_output_dir of a finished fit, e.g. models/demo-tutor)."
        )
    if (path / "adapter_config.json").is_file():
        adapter_dir = path
        run_dir = path.parent if (path.parent / CONFIG_YAML).is_file() and path.name == ADAPTER_DIR else None
    elif (path / ADAPTER_DIR / "adapter_config.json").is_file():
        adapter_dir, run_dir = path / ADAPTER_DIR, path
    else:
        raise Phi2TutorError(
            f"{str(path)!r} holds no LoRA adapter (no adapter_config.json in it or in its {ADAPTER_DIR}/). "
            "Give a run directory whose fit finished (lightning_logs/version_N) or an adapter directory "
            "written when a phi2tutor fit ended."
        )
    settings = read_tutor_settings(adapter_dir)
    if settings is not None:
        return TutorSource(adapter_dir, run_dir, settings, str(adapter_dir / TUTOR_SETTINGS_JSON))
    if run_dir is not None:
        return TutorSource(
            adapter_dir, run_dir, _settings_from_config(run_dir / CONFIG_YAML), str(run_dir / CONFIG_YAML)
        )
    return TutorSource(
        adapter_dir, None, _settings_from_peft(adapter_dir), str(adapter_dir / "adapter_config.json")
    )


def _settings_from_config(config_path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise Phi2TutorError(f"{config_path} is not valid YAML: {first_line(error)}") from None
    model = config.get("model") or {}
    # LightningCLI writes the fixed model class's options flat; a class_path form keeps them in init_args.
    return dict(model.get("init_args", model))


def _settings_from_peft(adapter_dir: Path) -> dict[str, Any]:
    """An adapter written before phi2tutor_adapter.json existed: base and LoRA settings from peft's file."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise Phi2TutorError(
            f"{adapter_dir} has no {TUTOR_SETTINGS_JSON} and its adapter_config.json names no base model. "
            "Give --model_name_or_path (and --prompt_template if the run used another one)."
        )
    print(
        f"phi2tutor | {adapter_dir} has no {TUTOR_SETTINGS_JSON}: base {base!r} and LoRA settings from "
        "adapter_config.json, default prompt template, no quantization (options override them)",
        file=sys.stderr,
    )
    return {
        "model_name_or_path": base,
        "lora_r": config.get("r", 8),
        "lora_alpha": config.get("lora_alpha", 16),
        "lora_target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
    }


def tutor_settings(source: TutorSource, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TutorModule keyword arguments: the saved settings, the user's overrides on top, the adapter set."""
    from phi2tutor.model import TutorModule

    settings = dict(source.settings)
    resolved = settings.pop("model_path_resolved", None)
    base = settings.get("model_name_or_path")
    if resolved and base and not Path(base).exists() and Path(resolved).is_dir():
        settings["model_name_or_path"] = resolved
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    accepted = set(inspect.signature(TutorModule.__init__).parameters) - {"self"}
    unknown = sorted(k for k in set(settings) - accepted if not k.startswith("_"))
    if unknown:
        # A setting of a newer or older phi2tutor: say so rather than drop it unseen.
        print(
            f"phi2tutor | notice: {source.settings_from} has settings this phi2tutor does not know, not "
            f"used: {', '.join(unknown)}",
            file=sys.stderr,
        )
    settings = {k: v for k, v in settings.items() if k in accepted}
    settings["adapter_path"] = str(source.adapter_dir)
    settings["adapter_output_dir"] = None
    # Inference: checkpointing would only turn the KV cache off.
    settings["gradient_checkpointing"] = False
    return settings


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Phi2TutorError(f"--device {device}: no CUDA device is available here. Use --device cpu.")
    return device


def load_tutor(
    path: str | Path, overrides: Mapping[str, Any] | None = None, device: str = "auto"
) -> TutorModule:
    """The tutor of a run or adapter directory, loaded, in eval mode and on ``device``, ready to generate."""
    from phi2tutor.model import TutorModule

    source = locate_tutor(path)
    module = TutorModule(**tutor_settings(source, overrides))
    module.configure_model()
    module.eval()
    module.requires_grad_(False)
    return module.to(resolve_device(device))


@dataclass
class GenerationSettings:
    """How an answer is decoded: greedy unless ``temperature`` is above 0."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0

    def validate(self, option_prefix: str = "--") -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise Phi2TutorError(
                f"{option_prefix}max_new_tokens must be at least 1, got {self.max_new_tokens}."
            )
        if self.temperature < 0:
            raise Phi2TutorError(
                f"{option_prefix}temperature must be 0 (greedy) or more, got {self.temperature}."
            )
        if not 0 < self.top_p <= 1:
            raise Phi2TutorError(f"{option_prefix}top_p must be in (0, 1], got {self.top_p}.")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for TutorModule.generate / transformers' generate."""
        kwargs: dict[str, Any] = {}
        if self.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.max_new_tokens
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            # Greedy: the tutor's answer is reproducible; sampling options of a generation_config stay off.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


class StopFlag:
    """A transformers stopping criterion that ends generation when its event is set (Ctrl-C in chat)."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def stream_answer(
    module: TutorModule, question: str, settings: GenerationSettings, stop: StopFlag | None = None
) -> Iterator[str]:
    """The answer to ``question`` as text pieces while it is generated (TextIteratorStreamer; generation
    runs in a thread). Joined and stripped, the pieces equal ``module.generate([question])[0]``."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(module.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = settings.generate_kwargs()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            module.generate([question], streamer=streamer, **kwargs)
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)
            streamer.end()

    stop = stop or StopFlag()
    kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    except BaseException:  # Ctrl-C or a closed consumer: end the generation at its next token
        stop.event.set()
        raise
    finally:
        thread.join()
    if failure:
        raise failure[0]
