"""Build the demo's small pre-trained base model, ``phi2tutor/assets/tiny-phi-arith/``.

A ~1M-parameter ``PhiForCausalLM`` (Phi-2's own class) is trained from scratch, with a plain
PyTorch loop on 2 CPU threads, on plain arithmetic lines ("12 + 7 = 19") and short narrative
sentences, never on the "Instruct: ...\\nOutput:" tutoring format: teaching that is LoRA's job in
the demo, as it is on the real Phi-2. The result is saved in bfloat16 with the bundled tokenizer.

    python scripts/build_demo_base.py                    # rebuild the shipped base and tokenizer
                                                         # (1000 steps: ~2.5 min on 2 idle cores)
    python scripts/build_demo_base.py --steps 200 --output-dir /tmp/base   # a quick try
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from phi2tutor.model import warmup_cosine_schedule
from phi2tutor.synthetic import NAMES, OBJECTS
from phi2tutor.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    build_tokenizer,
    bundled_tokenizer_path,
    default_tokenizer_corpus,
)

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "phi2tutor" / "assets" / "tiny-phi-arith"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of pre-training")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--max-operand", type=int, default=20, help="largest operand of + and -")
    parser.add_argument("--max-factor", type=int, default=12, help="largest factor of *")
    parser.add_argument(
        "--narrative-share",
        type=float,
        default=0.3,
        help="share of documents that are narrative sentences instead of arithmetic",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer vocabulary size"
    )
    return parser.parse_args()


def arithmetic_line(rng: random.Random, max_operand: int, max_factor: int) -> tuple[str, int]:
    """One "a op b = c" line with a non-negative result, and that result."""
    operation = rng.choice("+-*")
    if operation == "*":
        a, b = rng.randint(0, max_factor), rng.randint(0, max_factor)
        return f"{a} * {b} = {a * b}", a * b
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if operation == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}", a - b
    return f"{a} + {b} = {a + b}", a + b


def arithmetic_document(rng: random.Random, max_operand: int, max_factor: int) -> str:
    """A few arithmetic lines; some continue from the previous result, like a two-step solution."""
    lines = []
    for _ in range(rng.randint(1, 4)):
        line, result = arithmetic_line(rng, max_operand, max_factor)
        lines.append(line)
        if rng.random() < 0.4:
            # Chain: the next line starts from this result, so the model learns to carry it on
            # and to add or subtract with larger first operands (results of multiplications).
            operand = rng.randint(0, max_operand)
            if rng.random() < 0.5 or operand > result:
                lines.append(f"{result} + {operand} = {result + operand}")
            else:
                lines.append(f"{result} - {operand} = {result - operand}")
    return "\n".join(lines)


_NARRATIVE = {
    "en": [
        "{name} has {n} {obj}.",
        "{name} and {friend} like {obj}.",
        "{friend} buys {n} {obj}.",
        "There are {n} {obj} in the box.",
        "{name} gives {obj} to {friend}.",
        "{name} keeps the {obj} in a bag.",
        "{friend} picked {obj} in the morning.",
    ],
    "es": [
        "{name} tiene {n} {obj}.",
        "A {name} y a {friend} les gustan {the} {obj}.",
        "{friend} compra {n} {obj}.",
        "Hay {n} {obj} en la caja.",
        "{name} le da {obj} a {friend}.",
        "{name} guarda {the} {obj} en una bolsa.",
        "{friend} recogió {obj} por la mañana.",
    ],
}


def narrative_document(rng: random.Random, max_operand: int) -> str:
    """Plain sentences about people and things with numbers in them: the words of the word problems,
    but no question, no answer and no calculation (so the mapping to equations is left to LoRA)."""
    language = rng.choice(("en", "es"))
    sentences = []
    for _ in range(rng.randint(2, 4)):
        name, friend = rng.sample(NAMES[language], 2)
        obj, gender = rng.choice(OBJECTS[language])
        the = {"f": "las", "m": "los"}.get(gender, "the")  # Spanish articles agree with the object
        template = rng.choice(_NARRATIVE[language])
        sentences.append(
            template.format(name=name, friend=friend, obj=obj, the=the, n=rng.randint(2, max_operand))
        )
    return " ".join(sentences)


def token_stream(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> Iterator[int]:
    """An endless, seeded stream of documents separated by EOS, as token ids."""
    rng = random.Random(args.seed)
    while True:
        if rng.random() < args.narrative_share:
            document = narrative_document(rng, args.max_operand)
        else:
            document = arithmetic_document(rng, args.max_operand, args.max_factor)
        yield from tokenizer(document)["input_ids"]
        yield tokenizer.eos_token_id


def packed_batches(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> Iterator[torch.Tensor]:
    """Batches of [batch_size, seq_len] token ids cut from the stream: no padding, no waste."""
    stream = token_stream(tokenizer, args)
    while True:
        ids = [next(stream) for _ in range(args.batch_size * args.seq_len)]
        yield torch.tensor(ids).view(args.batch_size, args.seq_len)


def demo_base_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> PhiConfig:
    return PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=512,
        partial_rotary_factor=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,  # like Phi-2: the project pads with EOS and masks by attention mask
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    # The tokenizer is rebuilt (deterministic, under a second) so that one command reproduces every
    # shipped file; the bundled copy is only replaced when the shipped base is.
    tokenizer = build_tokenizer(default_tokenizer_corpus(), vocab_size=args.vocab_size)
    if args.output_dir.resolve() == DEFAULT_OUTPUT_DIR:
        tokenizer.save_pretrained(str(bundled_tokenizer_path()))
    model = PhiForCausalLM(demo_base_config(args, tokenizer))
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))

    # The fine-tuning schedule (transformers' warmup + cosine), down to 10% of peak. The shipped base was
    # built with a hand-written copy whose warmup started one step higher.
    scheduler = warmup_cosine_schedule(optimizer, args.warmup_steps, args.steps, min_lr_ratio=0.1)
    model.train()
    started = time.perf_counter()
    running_loss = 0.0
    for step, batch in zip(range(args.steps), packed_batches(tokenizer, args)):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running_loss += loss.item()
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1:5d}  loss {running_loss / 100:.3f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - started:.0f}s",
                flush=True,
            )
            running_loss = 0.0

    model.eval()
    prompt = tokenizer("7 + 5 =", return_tensors="pt")
    sample = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print("sample:", repr(tokenizer.decode(sample[0])))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(args.output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(args.output_dir))
    print(f"saved to {args.output_dir} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
