"""phi2tutor export: the merged transformers directory answers like base + adapter with transformers alone;
the GGUF file's metadata and tensors; llama.cpp's greedy answers (skipped without llama_cpp installed)."""

from __future__ import annotations

import json

import pytest
import torch

from phi2tutor.cli import main
from phi2tutor.prompts import PHI2_QA_TEMPLATE
from phi2tutor.tutor import load_tutor
from tests.tutor_run import HELD_OUT


@pytest.fixture(scope="module")
def reference(tiny_tutor_run) -> list[str]:
    return load_tutor(tiny_tutor_run, device="cpu").generate(HELD_OUT)


def _transformers_answers(directory, dtype) -> list[str]:
    """Greedy answers with nothing but transformers (the model card's recipe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    answers = []
    for question in HELD_OUT:
        inputs = tokenizer(PHI2_QA_TEMPLATE.format(question=question), return_tensors="pt")
        output = model.generate(**inputs)  # generation_config.json: greedy, stop at EOS, max_new_tokens
        answers.append(
            tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return answers


@pytest.fixture(scope="module")
def exported(tiny_tutor_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    main(["export", str(tiny_tutor_run), "--output", str(out / "fp32"), "--dtype", "float32"])
    main(["export", str(tiny_tutor_run), "--output", str(out / "fp16")])
    main(["export", str(tiny_tutor_run), "--output", str(out / "gguf"), "--format", "gguf"])
    main(
        [
            "export",
            str(tiny_tutor_run),
            "--output",
            str(out / "q8"),
            "--format",
            "gguf",
            "--gguf_type",
            "q8_0",
        ]
    )
    return out


def test_merged_directory_answers_like_base_plus_adapter(exported, reference) -> None:
    from safetensors import safe_open

    assert _transformers_answers(exported / "fp32", torch.float32) == reference
    with safe_open(exported / "fp16" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert {weights.get_tensor(n).dtype for n in names} == {torch.float16}
    assert not any("lora" in n or "modules_to_save" in n for n in names)
    assert _transformers_answers(exported / "fp16", torch.float16) == reference
    config = json.loads((exported / "fp16" / "config.json").read_text())
    assert config["model_type"] == "phi" and config["architectures"] == ["PhiForCausalLM"]
    generation = json.loads((exported / "fp16" / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 40


def test_model_card_states_base_lora_and_the_reports_numbers(exported, tiny_tutor_run) -> None:
    card = (exported / "fp16" / "README.md").read_text()
    report = json.loads((tiny_tutor_run / "report.json").read_text())
    assert "tiny-phi-arith" in card and "r 8, alpha 16" in card and "embed_tokens, lm_head" in card
    last = report["loss"]["last"]
    assert f"| last logged loss (step {last['step']}) | {last['value']} |" in card
    assert f"| loss reduction, first to last logged | {report['loss']['reduction_pct']} % |" in card
    assert f"| epochs run | {report['general']['epochs_run']} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_export_refuses_to_write_over_the_tutor_or_a_full_directory(tiny_tutor_run, exported, capsys) -> None:
    for output, message in (
        (tiny_tutor_run / "adapter", "would write over"),
        (exported / "fp16", "not empty"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(tiny_tutor_run), "--output", str(output)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_gguf_metadata_tensors_and_modelfile(exported, tiny_tutor_run) -> None:
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    merged = load_file(exported / "fp32" / "model.safetensors")
    for name, kind in (("gguf", gguf.GGMLQuantizationType.F16), ("q8", gguf.GGMLQuantizationType.Q8_0)):
        (path,) = (exported / name).glob("*.gguf")
        reader = gguf.GGUFReader(path)

        def field(key, reader=reader):
            return reader.fields[key].contents()

        assert field("general.architecture") == "phi2"
        assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
        tokens = field("tokenizer.ggml.tokens")
        assert len(tokens) == 512 and tokens[0] == "<|endoftext|>"
        assert field("tokenizer.ggml.token_type")[0] == gguf.TokenType.CONTROL
        assert field("tokenizer.ggml.eos_token_id") == 0 and field("tokenizer.ggml.add_bos_token") is False
        assert len(field("tokenizer.ggml.merges")) == 255
        assert field("phi2.rope.dimension_count") == 16 and field("phi2.block_count") == 4
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == len(merged) and {
            "token_embd.weight",
            "output.bias",
            "blk.3.ffn_down.weight",
        } <= set(tensors)
        assert tensors["blk.0.attn_q.weight"].tensor_type == kind
        assert tensors["blk.0.attn_norm.bias"].tensor_type == gguf.GGMLQuantizationType.F32
        if name == "gguf":
            embedding = np.asarray(tensors["token_embd.weight"].data, dtype=np.float32)
            expected = merged["model.embed_tokens.weight"].numpy()
            np.testing.assert_allclose(embedding.reshape(expected.shape), expected, atol=2e-3, rtol=2e-3)
        modelfile = (exported / name / "Modelfile").read_text()
        assert (
            f"FROM ./{path.name}" in modelfile
            and 'TEMPLATE """Instruct: {{ .Prompt }}\nOutput:"""' in modelfile
        )


def test_llama_cpp_answers_like_transformers(exported, reference) -> None:
    llama_cpp = pytest.importorskip(
        "llama_cpp"
    )  # not a CI dependency: benchmarks/export_gguf_check.py installs it
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported / "fp32")
    for name in ("gguf", "q8"):
        (path,) = (exported / name).glob("*.gguf")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
        for question, answer in zip(HELD_OUT, reference):
            prompt = PHI2_QA_TEMPLATE.format(question=question)
            assert llm.tokenize(prompt.encode(), add_bos=False) == tokenizer(prompt)["input_ids"]
            text = llm.create_completion(prompt, max_tokens=40, temperature=0.0)["choices"][0]["text"]
            assert text.strip() == answer
