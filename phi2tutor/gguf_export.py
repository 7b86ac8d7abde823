"""GGUF export of a merged tutor for llama.cpp and Ollama, written with the ``gguf`` package's writer
(llama.cpp's own converter script is not on the package index): llama.cpp's ``phi2`` architecture, tensor
names from gguf's mapping, the byte-level BPE tokenizer as ``gpt2`` tokens and merges, f16 or q8_0, and an
Ollama Modelfile beside the file.

The bundled tokenizer pre-splits every digit before GPT-2's byte-level regex; llama.cpp's ``gpt-2``
pre-tokenizer does not, but no merge of this vocabulary joins a digit to anything, so both give the same
tokens (export checks the merges; benchmarks/export_gguf_check.py compares llama.cpp's token ids and greedy
answers with transformers'). A tokenizer whose merges do join digits is refused rather than mis-exported.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from phi2tutor.errors import Phi2TutorError
from phi2tutor.prompts import format_prompt

GGUF_ARCH = "phi2"
# llama.cpp's pre-tokenizer names (llama-vocab.cpp); "gpt-2" is GPT-2's byte-level regex.
GPT2_PRE_TOKENIZER = "gpt-2"


def _tokenizer_json(tokenizer) -> dict[str, Any]:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer that reproduces this tokenizer's splits, or an error saying why none does."""
    model = tokenizer_json.get("model", {})
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or len(byte_level) != 1 or not byte_level[0].get("use_regex", True):
        raise Phi2TutorError(
            f"The tutor's tokenizer (model {model.get('type')}, pre-tokenizers {kinds}) is not a byte-level BPE "
            "with GPT-2's regex; phi2tutor's GGUF export writes only that kind (Phi-2's and the bundled one)."
        )
    if byte_level[0].get("add_prefix_space"):
        raise Phi2TutorError(
            "The tutor's tokenizer adds a prefix space, which llama.cpp's gpt-2 pre-tokenizer does not."
        )
    for part in parts:
        if part.get("type") == "ByteLevel":
            continue
        if part.get("type") == "Digits" and part.get("individual_digits"):
            # Equivalent under gpt-2's regex only if no merge ever joins a digit with another symbol.
            # Byte-level symbols: ASCII digits stand for themselves ("³" there is a UTF-8 byte, not a digit).
            joined = [m for m in _merges(model) if any(ch in "0123456789" for ch in "".join(m))]
            if joined:
                raise Phi2TutorError(
                    f"The tokenizer splits digits one by one, but {len(joined)} of its merges join digits "
                    f"(e.g. {joined[0]}): llama.cpp's gpt-2 pre-tokenizer would tokenize numbers differently. "
                    "llama.cpp needs a pre-tokenizer type for this tokenizer that the gguf package cannot add."
                )
            continue
        raise Phi2TutorError(
            f"The tutor's tokenizer has a {part.get('type')} pre-tokenizer that llama.cpp's gpt-2 pre-tokenizer "
            "does not reproduce; exporting it would give other tokens than transformers."
        )
    return GPT2_PRE_TOKENIZER


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    merges = model.get("merges") or []
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def add_tokenizer(writer, tokenizer, tokenizer_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.*: gpt2 model, tokens (byte-level strings) with their types, merges, special ids."""
    import gguf

    tokenizer_json = _tokenizer_json(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # the model's vocabulary is padded beyond the tokenizer's
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise Phi2TutorError(
            f"No BPE merges found in {tokenizer_dir}/tokenizer.json: the GGUF would not tokenize."
        )
    special.add_to_gguf(writer, quiet=True)
    # Phi-2 prompts start without BOS, as phi2tutor trains them.
    writer.add_add_bos_token(False)


def add_parameters(writer, config, file_type: int) -> None:
    """The phi2 hyperparameters llama.cpp reads (as llama.cpp's converter writes them for PhiForCausalLM)."""
    head_dim = config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 0.5))
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if getattr(config, "qk_layernorm", False):
        raise Phi2TutorError("The base uses qk_layernorm, which llama.cpp's phi2 architecture does not have.")
    if config.hidden_act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
        raise Phi2TutorError(f"The base's activation {config.hidden_act!r} is not llama.cpp phi2's GELU.")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_rope_dimension_count(int(head_dim * partial))
    writer.add_rope_freq_base(float(theta))
    writer.add_file_type(file_type)


def add_tensors(writer, model, n_layers: int, gguf_type: str) -> int:
    """Every weight under its llama.cpp name: 2-D weights in f16 or q8_0, 1-D ones (norms, biases) in f32."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, n_layers)
    q8 = gguf.GGMLQuantizationType.Q8_0
    count = 0
    for name, tensor in model.state_dict().items():
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise Phi2TutorError(
                f"No llama.cpp phi2 tensor name for {name!r}: the GGUF export does not know it."
            )
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 1:
            writer.add_tensor(new_name, data.astype(np.float32))
        elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
            writer.add_tensor(new_name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:  # f16, or a row length q8_0's 32-value blocks do not divide
            writer.add_tensor(new_name, data.astype(np.float16))
        count += 1
    return count


def modelfile(gguf_name: str, prompt_template: str, max_new_tokens: int, eos_token: str) -> str:
    """An Ollama Modelfile: the tutor's prompt template, greedy decoding, stop at EOS."""
    template = format_prompt(prompt_template, "{{ .Prompt }}")
    return (
        f"# Ollama: ollama create tutor -f Modelfile && ollama run tutor\n"
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{template}"""\n'
        "PARAMETER temperature 0\n"
        f"PARAMETER num_predict {max_new_tokens}\n"
        f'PARAMETER stop "{eos_token}"\n'
    )


def export_gguf(path, output, gguf_type: str = "f16", overrides=None, overwrite: bool = False) -> Path:
    """Merge the tutor (in float32, so quantization rounds once) and write OUTPUT/NAME-TYPE.gguf and a Modelfile."""
    import gguf

    from phi2tutor.export import check_output_dir, merged_model
    from phi2tutor.tutor import locate_tutor

    output = Path(output)
    source = locate_tutor(path)
    check_output_dir(output, source, overwrite)
    model, tokenizer, settings = merged_model(source, overrides, "float32")
    config = model.config
    if config.model_type != "phi":
        raise Phi2TutorError(
            f"The base is a {config.model_type!r} model; GGUF export writes llama.cpp's phi2 (Phi-2's class)."
        )
    output.mkdir(parents=True, exist_ok=True)
    name = (source.run_dir or source.adapter_dir).resolve().name
    if name == "adapter":
        name = source.adapter_dir.resolve().parent.name
    gguf_name = f"{name}-{gguf_type}.gguf"
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer = gguf.GGUFWriter(output / gguf_name, GGUF_ARCH)
    writer.add_name(name)
    add_parameters(writer, config, int(file_type))
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # gguf's SpecialVocab reads the saved files
        tokenizer.save_pretrained(tokenizer_dir)
        add_tokenizer(writer, tokenizer, Path(tokenizer_dir), config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = add_tensors(writer, model, config.num_hidden_layers, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (output / "Modelfile").write_text(
        modelfile(gguf_name, settings["prompt_template"], settings["max_new_tokens"], tokenizer.eos_token),
        encoding="utf-8",
    )
    size_mb = (output / gguf_name).stat().st_size / 2**20
    print(
        f"phi2tutor | {output / gguf_name}: llama.cpp {GGUF_ARCH}, {gguf_type}, {tensors} tensors, "
        f"{size_mb:.1f} MB; Ollama Modelfile beside it",
        file=sys.stderr,
    )
    return output / gguf_name
