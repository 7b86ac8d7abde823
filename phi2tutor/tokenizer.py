"""The demo's real tokenizer: a small GPT-2-style byte-level BPE, like Phi-2's CodeGen tokenizer.

It is trained offline on the bundled word problems (English and Spanish) and arithmetic lines,
splits every digit into its own token, and ships in ``phi2tutor/assets/tokenizer/``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"  # Phi-2's eos, bos and unk token
DEFAULT_VOCAB_SIZE = 512


def bundled_tokenizer_path() -> Path:
    """Directory of the shipped tokenizer; ``AutoTokenizer.from_pretrained`` loads it offline."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer"


def build_tokenizer(corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a transformers fast tokenizer.

    Byte-level means any text encodes (no unknown characters); digits are split one per token
    before the byte-level step, so "128" is "1", "2", "8" and arithmetic sees each digit. There is
    no pad token: the project pads with EOS and masks by the attention mask, as for Phi-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        # All 256 bytes are in the vocabulary whatever the corpus holds, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=2048,  # Phi-2's context length
        clean_up_tokenization_spaces=False,
    )


def default_tokenizer_corpus(seed: int = 0, problems_per_language: int = 4000) -> Iterator[str]:
    """Texts the bundled tokenizer is trained on: word problems and solutions in both languages,
    plain arithmetic lines, and the Phi-2 prompt words, in a fixed order (so training is deterministic)."""
    from phi2tutor.synthetic import generate_problems

    for language in ("en", "es"):
        for problem in generate_problems(
            problems_per_language, seed, language=language, max_operand=20, two_step_share=0.3
        ):
            yield f"Instruct: {problem['question']}\nOutput: {problem['answer']}"
    rng = random.Random(seed)
    for _ in range(2000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        yield f"{a} + {b} = {a + b}\n{max(a, b)} - {min(a, b)} = {abs(a - b)}\n{a} * {b} = {a * b}"


def build_bundled_tokenizer(
    output_dir: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Build the project's tokenizer from :func:`default_tokenizer_corpus` and save it (default:
    the bundled path)."""
    tokenizer = build_tokenizer(default_tokenizer_corpus(), vocab_size=vocab_size)
    tokenizer.save_pretrained(str(output_dir or bundled_tokenizer_path()))
    return tokenizer
