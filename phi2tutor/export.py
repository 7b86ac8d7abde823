"""``phi2tutor export``: merge a trained tutor's LoRA (and modules_to_save) into its base with peft's
merge_and_unload, and write a standard transformers model directory (safetensors, tokenizer, generation
config, model card), or a GGUF file for llama.cpp / Ollama (phi2tutor/gguf_export.py).

A QLoRA run is merged into the unquantized base weights, not into 4-bit ones: W + BA re-quantized to NF4
would lose most of the adapter's small update in the rounding, and the 4-bit format is bitsandbytes' own,
which other runtimes do not read. Quantize the merged model afterwards (GGUF q8_0, or load_in_4bit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi2tutor.errors import Phi2TutorError
from phi2tutor.keys import REPORT_JSON
from phi2tutor.phi2 import PHI2_LORA_TARGETS

if TYPE_CHECKING:
    from phi2tutor.tutor import TutorSource

EXPORT_DTYPES = ("float16", "float32", "bfloat16")
GGUF_TYPES = ("f16", "q8_0")


def build_parser() -> argparse.ArgumentParser:
    from phi2tutor.chat import add_tutor_arguments

    parser = argparse.ArgumentParser(
        prog="phi2tutor export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_tutor_arguments(parser)
    parser.add_argument("--output", required=True, help="directory to write (created; must be empty or new)")
    parser.add_argument(
        "--format",
        choices=("transformers", "gguf"),
        default="transformers",
        help="output format (default transformers)",
    )
    parser.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        default="float16",
        help="weights of the transformers export (default float16)",
    )
    parser.add_argument(
        "--gguf_type",
        choices=GGUF_TYPES,
        default="f16",
        help="GGUF weight type: f16 (default) or q8_0 (8-bit, half the size)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output directory")
    return parser


def check_output_dir(output: Path, source: TutorSource, overwrite: bool) -> None:
    """Refuse an ``output`` that is (or holds) the tutor's own directories, a file, or full without --overwrite."""
    resolved = output.resolve()
    for directory in (d for d in (source.adapter_dir, source.run_dir) if d is not None):
        if resolved == directory.resolve() or directory.resolve().is_relative_to(resolved):
            raise Phi2TutorError(
                f"--output {output} would write over the tutor being exported ({directory}). Choose a new directory."
            )
    if output.exists() and not output.is_dir():
        raise Phi2TutorError(f"--output {output} is a file. Give a directory.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise Phi2TutorError(f"--output {output} is not empty. Choose a new directory, or add --overwrite.")


def merged_model(source: TutorSource, overrides: dict[str, Any] | None, dtype: str):
    """(merged transformers model in ``dtype``, tokenizer, TutorModule settings).

    The base is loaded unquantized in ``dtype`` whatever the run trained on; LoRA is added into it.
    """
    from phi2tutor.loading import DTYPES
    from phi2tutor.model import TutorModule
    from phi2tutor.tutor import tutor_settings

    settings = tutor_settings(source, overrides)
    trained_quantization = settings.get("quantization", "none")
    if trained_quantization != "none":
        print(
            f"phi2tutor | the run trained on a {trained_quantization} base: merging into the unquantized "
            f"base weights in {dtype} (a 4-bit merge would round most of the LoRA update away)",
            file=sys.stderr,
        )
    # Plain attention: nothing runs here, and the saved config must name one every transformers knows.
    settings.update(quantization="none", compute_dtype=dtype, attn_implementation="eager")
    module = TutorModule(**settings)
    module.configure_model()
    merged = module.model.merge_and_unload()
    # modules_to_save copies were trained in fp32; the whole model goes out in one dtype.
    merged = merged.to(DTYPES[dtype])
    merged.eval()
    merged.config.use_cache = True
    return merged, module.tokenizer, dict(module.hparams)


def generation_config(model, tokenizer, settings: dict[str, Any]):
    """Greedy decoding that stops at EOS, as the tutor was evaluated."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=settings["max_new_tokens"],
        do_sample=False,
    )


def export_transformers(
    path: str | Path, output: str | Path, dtype: str = "float16", overrides=None, overwrite=False
) -> Path:
    """Write the merged tutor as a transformers model directory; returns it."""
    from phi2tutor.tutor import locate_tutor

    output = Path(output)
    source = locate_tutor(path)
    check_output_dir(output, source, overwrite)
    model, tokenizer, settings = merged_model(source, overrides, dtype)
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config(model, tokenizer, settings)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / "README.md").write_text(model_card(settings, source, dtype, output), encoding="utf-8")
    print(
        f"phi2tutor | merged model ({dtype}, safetensors), tokenizer, generation config and model card in {output}"
    )
    return output


def report_numbers(run_dir: Path | None) -> list[tuple[str, str]]:
    """Key numbers of the run's training report (report.json, run.json) when the run directory has them."""
    if run_dir is None:
        return []
    rows: list[tuple[str, str]] = []
    report = _read_json(run_dir / REPORT_JSON)
    general = (report or {}).get("general") or {}
    for key, label in (
        ("epochs_run", "epochs run"),
        ("optimizer_steps", "optimizer steps"),
        ("duration_seconds", "training time (s)"),
        ("trainable_parameters", "trainable parameters"),
    ):
        if general.get(key) is not None:
            rows.append((label, str(general[key])))
    loss = (report or {}).get("loss") or {}
    for key, label in (("first", "first logged loss"), ("last", "last logged loss")):
        point = loss.get(key) or {}
        if point.get("value") is not None:
            rows.append((f"{label} (step {point['step']})", str(point["value"])))
    smoothed = loss.get("smoothed_final") or {}
    if smoothed.get("value") is not None:
        rows.append(
            (
                f"final loss, {smoothed['rule']} of the last {smoothed['points']} points",
                str(smoothed["value"]),
            )
        )
    if loss.get("reduction_pct") is not None:
        rows.append(("loss reduction, first to last logged", f"{loss['reduction_pct']} %"))
    accuracy = ((report or {}).get("validation") or {}).get("answer_accuracy") or {}
    for key in ("first", "best", "last"):
        if accuracy.get(key) is None:
            continue
        epoch = accuracy.get(f"{key}_epoch")
        label = (
            "answer accuracy before training" if key == "first" and epoch == 0 else f"answer accuracy, {key}"
        )
        rows.append((label, f"{accuracy[key]} % (epoch {epoch})"))
    stop = (report or {}).get("stop") or {}
    if stop.get("message"):
        rows.append(("why it stopped", str(stop["message"])))
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_card(settings: dict[str, Any], source, dtype: str, output: Path) -> str:
    base = settings.get("model_name_or_path")
    if settings.get("model_config") is not None:
        base = f"PhiForCausalLM built from model_config {json.dumps(settings['model_config'])}"
    targets = settings.get("lora_target_modules") or PHI2_LORA_TARGETS
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [phi2tutor, math, lora, merged]",
        "---",
        "",
        f"# {output.name}: a math tutor merged by phi2tutor",
        "",
        f"LoRA adapter `{source.adapter_dir}` merged into its base with peft's `merge_and_unload`; "
        f"weights in {dtype} (safetensors). Loading it needs transformers only: no peft, no phi2tutor.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} |",
        f"| quantization while training | {settings.get('quantization', 'none')} (merged into the unquantized base) |",
        f"| LoRA | r {settings.get('lora_r')}, alpha {settings.get('lora_alpha')}, dropout {settings.get('lora_dropout')}, on {', '.join(targets)} |",
        f"| trained in full beside LoRA | {', '.join(settings.get('modules_to_save') or []) or 'nothing'} |",
        f"| prompt template | `{json.dumps(settings.get('prompt_template'))}` |",
    ]
    if settings.get("calculator") is not None:
        lines.append(
            f"| calculator decoding while training/evaluating | {settings['calculator']} (not part of these weights) |"
        )
    numbers = report_numbers(source.run_dir)
    if numbers:
        lines += ["", f"## Training report (`{source.run_dir}`)", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in numbers]
    template = settings["prompt_template"]
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{output}")',
        f'model = AutoModelForCausalLM.from_pretrained("{output}")',
        f'prompt = {json.dumps(template)}.format(question="Ana has 7 apples and buys 5 more. How many apples does she have?")',
        'inputs = tokenizer(prompt, return_tensors="pt")',
        "output = model.generate(**inputs)  # greedy, stops at EOS (generation_config.json)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "The answer ends with `#### N`, the final answer.",
        "",
    ]
    return "\n".join(lines)


def main_export(argv: list[str]) -> None:
    from phi2tutor.chat import overrides_from

    args = build_parser().parse_args(argv)
    if args.format == "gguf":
        from phi2tutor.gguf_export import export_gguf

        if args.dtype != "float16":
            print(
                "phi2tutor | notice: --dtype applies to --format transformers; GGUF uses --gguf_type",
                file=sys.stderr,
            )
        export_gguf(args.path, args.output, args.gguf_type, overrides_from(args), args.overwrite)
    else:
        if args.gguf_type != "f16":
            print("phi2tutor | notice: --gguf_type applies to --format gguf only", file=sys.stderr)
        export_transformers(args.path, args.output, args.dtype, overrides_from(args), args.overwrite)
