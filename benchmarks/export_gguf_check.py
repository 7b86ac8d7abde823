"""GGUF export, verified: install llama-cpp-python if needed (it builds llama.cpp from source, minutes),
export a trained tutor to GGUF f16 and q8_0, and compare llama.cpp's prompt tokens and greedy answers with
transformers' (the merged model) on held-out problems of the bundled generator.

    python benchmarks/export_gguf_check.py [RUN_OR_ADAPTER_DIR] [--problems 64]   (default models/demo-tutor)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ensure_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(
            "installing llama-cpp-python (builds llama.cpp from source; several minutes on 2 cores)",
            flush=True,
        )
        env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=off")}
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python"], check=True, env=env
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tutor", nargs="?", default=str(ROOT / "models" / "demo-tutor"))
    parser.add_argument("--problems", type=int, default=64)
    args = parser.parse_args()
    ensure_llama_cpp()
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi2tutor.export import export_transformers
    from phi2tutor.gguf_export import export_gguf
    from phi2tutor.grading import grade
    from phi2tutor.prompts import PHI2_QA_TEMPLATE, format_prompt
    from phi2tutor.synthetic import SyntheticSpec, generate_splits
    from phi2tutor.tutor import locate_tutor, tutor_settings

    template = tutor_settings(locate_tutor(args.tutor)).get("prompt_template") or PHI2_QA_TEMPLATE
    problems = generate_splits(
        SyntheticSpec(train_size=10, val_size=10, test_size=args.problems, max_operand=10)
    )
    problems = problems["test"][: args.problems]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        export_transformers(args.tutor, work / "hf", "float32")
        tokenizer = AutoTokenizer.from_pretrained(work / "hf")
        model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
        prompts = [format_prompt(template, p["question"]) for p in problems]
        reference = []
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
            reference.append(
                tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            )
        right = sum(grade(a, p["answer"]).correct for a, p in zip(reference, problems))
        print(f"transformers (merged, float32): answer accuracy {right}/{len(problems)}")
        results = []
        for kind in ("f16", "q8_0"):
            path = export_gguf(args.tutor, work / kind, kind)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
            same_tokens = same_answers = correct = 0
            for prompt, answer, problem in zip(prompts, reference, problems):
                same_tokens += llm.tokenize(prompt.encode(), add_bos=False) == tokenizer(prompt)["input_ids"]
                text = llm.create_completion(prompt, max_tokens=40, temperature=0.0)["choices"][0][
                    "text"
                ].strip()
                same_answers += text == answer
                correct += grade(text, problem["answer"]).correct
            size_mb = path.stat().st_size / 2**20
            print(
                f"llama.cpp {kind} ({size_mb:.2f} MB): prompt tokens identical {same_tokens}/{len(prompts)}, greedy "
                f"answers identical to transformers {same_answers}/{len(prompts)}, answer accuracy {correct}/{len(prompts)}"
            )
            results.append((kind, same_tokens, same_answers))
    total = len(prompts)
    summary = ", ".join(f"{k} tokens {t}/{total} answers {a}/{total}" for k, t, a in results)
    print(f"RESULT llama.cpp vs transformers on {total} held-out problems: {summary}")


if __name__ == "__main__":
    main()
