"""``phi2tutor chat``: ask a trained tutor questions in the terminal (answers stream as they are generated,
then the extracted final answer), or answer ``--question`` / one question per standard-input line for scripts.

Interactive conventions: a line ending in a backslash continues the question on the next line; /reset
discards a question being typed and the input history; /quit (or Ctrl-D) ends; Ctrl-C stops the answer
being generated, not the session. The tutor answers each question on its own: it was trained on single
questions, so earlier questions are not part of the prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import TextIO

from phi2tutor.errors import Phi2TutorError
from phi2tutor.prompts import PHI2_QA_TEMPLATE_ES

PROMPT = ">>> "
CONTINUATION = "... "
HELP_TEXT = """Type a math question and press Enter; the answer streams, then its final answer.
  end a line with \\ to continue the question on the next line
  Ctrl-C   stop the answer being generated (the session goes on)
  /reset   discard the question being typed and the input history
  /quit    end the session (or Ctrl-D)
  /help    this text"""
LABELS = {
    "en": {"final": "Final answer", "none": "(no final answer found)", "stopped": "[stopped]"},
    "es": {"final": "Respuesta final", "none": "(no se encontró respuesta final)", "stopped": "[detenido]"},
}


def add_tutor_arguments(parser: argparse.ArgumentParser) -> None:
    """The tutor source, device and setting overrides: the same for chat, serve and export."""
    from phi2tutor.tutor import OVERRIDE_OPTIONS

    parser.add_argument(
        "path",
        metavar="RUN_OR_ADAPTER_DIR",
        help="a run directory (lightning_logs/version_N) or an adapter directory (e.g. models/demo-tutor)",
    )
    for name, kind, text in OVERRIDE_OPTIONS:
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N; auto: the GPU when there is one (default)"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="answer length limit (default: the run's max_new_tokens)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy, reproducible (default); above 0 samples"
    )
    parser.add_argument(
        "--top_p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible samples)")


def overrides_from(args: argparse.Namespace) -> dict:
    from phi2tutor.tutor import OVERRIDE_OPTIONS

    return {name: getattr(args, name) for name, _, _ in OVERRIDE_OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi2tutor chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_tutor_arguments(parser)
    parser.add_argument(
        "--question",
        action="append",
        default=None,
        help="answer this question and exit (repeatable); without it, questions are read from standard "
        "input one per line when it is not a terminal",
    )
    add_generation_arguments(parser)
    parser.add_argument(
        "--decimal_comma", action="store_true", help="read final answers with a decimal comma (1.234,5)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="non-interactive: one JSON line per question (question, answer, final_answer)",
    )
    return parser


class ChatSession:
    """Answers questions with a loaded tutor, printing the streamed answer and its final answer."""

    def __init__(self, module, settings, decimal_comma: bool = False, out: TextIO | None = None) -> None:
        self.module = module
        self.settings = settings
        self.decimal_comma = decimal_comma
        self.out = out or sys.stdout
        language = "es" if module.hparams.prompt_template == PHI2_QA_TEMPLATE_ES else "en"
        self.labels = LABELS[language]

    def answer(self, question: str, echo: bool = True) -> tuple[str, str | None, bool]:
        """Stream the answer to ``question``; returns (answer, final answer, whether it was stopped)."""
        from phi2tutor.grading import extract_answer
        from phi2tutor.tutor import StopFlag, stream_answer

        pieces: list[str] = []
        stopped = False
        stop = StopFlag()
        stream = stream_answer(self.module, question, self.settings, stop)
        try:
            for piece in stream:
                if not pieces:  # the answer starts after the prompt's "Output:" with a space
                    piece = piece.lstrip()
                    if not piece:
                        continue
                pieces.append(piece)
                if echo:
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:  # Ctrl-C: end this answer at the next token, keep the session
            stopped = True
            stop.event.set()
        finally:
            stream.close()  # waits for the generation thread
        answer = "".join(pieces).strip()
        final = extract_answer(answer, self.decimal_comma)
        if echo:
            if stopped:
                self.out.write(f" {self.labels['stopped']}")
            self.out.write(
                f"\n{self.labels['final']}: {final if final is not None else self.labels['none']}\n"
            )
            self.out.flush()
        return answer, final, stopped

    def run_batch(self, questions: Iterable[str], as_json: bool) -> int:
        """Non-interactive: each question, its answer and final answer; returns how many were answered."""
        count = 0
        for question in questions:
            question = question.strip()
            if not question:
                continue
            if as_json:
                answer, final, _ = self.answer(question, echo=False)
                record = {"question": question, "answer": answer, "final_answer": final}
                self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.out.flush()
            else:
                self.out.write(f"Q: {question}\n")
                self.answer(question)
                self.out.write("\n")
            count += 1
        return count

    def run_interactive(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # Windows without pyreadline: plain input() still works
            readline = None
        self.out.write(HELP_TEXT + "\n\n")
        lines: list[str] = []
        while True:
            try:
                line = input(CONTINUATION if lines else PROMPT)
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:  # as in Python's REPL: drop what is being typed
                self.out.write("\n")
                lines = []
                continue
            command = line.strip()
            if not lines and command in ("/quit", "/exit"):
                return
            if not lines and command == "/help":
                self.out.write(HELP_TEXT + "\n")
                continue
            if command == "/reset":
                lines = []
                if readline is not None:
                    readline.clear_history()
                self.out.write("(reset)\n")
                continue
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            question = "\n".join(lines).strip()
            lines = []
            if question:
                self.answer(question)


def quiet_libraries() -> None:
    """No weight-loading progress bars or library deprecation warnings between the user and the answers."""
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main_chat(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    from phi2tutor.tutor import GenerationSettings, load_tutor

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    settings.validate()
    interactive = args.question is None and sys.stdin.isatty()
    if not interactive and sys.stdin is not None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    quiet_libraries()
    print(f"phi2tutor | loading the tutor from {args.path}", file=sys.stderr)
    module = load_tutor(args.path, overrides_from(args), device=args.device)
    session = ChatSession(module, settings, args.decimal_comma)
    if args.question is not None:
        session.run_batch(args.question, args.json)
    elif not interactive:
        if session.run_batch(sys.stdin, args.json) == 0:
            raise Phi2TutorError("No question on standard input: give one question per line, or --question.")
    else:
        session.run_interactive()
