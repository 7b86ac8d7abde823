"""phi2tutor chat and the shared tutor loader: the settings file beside the adapter, run / adapter / config
fallbacks, --question and stdin modes, streaming, Ctrl-C, and the interactive session through a pty."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from phi2tutor.chat import ChatSession
from phi2tutor.cli import main
from phi2tutor.grading import extract_answer
from phi2tutor.keys import TUTOR_SETTINGS_JSON
from phi2tutor.prompts import PHI2_QA_TEMPLATE
from phi2tutor.tutor import GenerationSettings, load_tutor, stream_answer
from tests.conftest import REPO
from tests.tutor_run import DEMO_BASE, HELD_OUT

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tutor(tiny_tutor_run):
    return load_tutor(tiny_tutor_run, device="cpu")


@pytest.fixture(scope="module")
def reference(tutor) -> list[str]:
    """Greedy answers of base + adapter (TutorModule.generate), what every mode must print."""
    answers = tutor.generate(HELD_OUT)
    # The tutor answers the English problems it was trained on in its format (real final answers below);
    # the Spanish one is outside its training: whatever it says (maybe nothing) is what chat must show.
    assert all(extract_answer(a) is not None and "####" in a for a in answers[:3]), answers
    return answers


def _block(question: str, answer: str) -> str:
    final = extract_answer(answer)
    return f"Q: {question}\n{answer}\nFinal answer: {final if final is not None else '(no final answer found)'}\n\n"


def test_settings_file_beside_adapter_holds_what_rebuilds_the_tutor(tiny_tutor_run) -> None:
    for adapter_dir in (tiny_tutor_run / "adapter", tiny_tutor_run.parent.parent / "models" / "tiny-tutor"):
        saved = json.loads((adapter_dir / TUTOR_SETTINGS_JSON).read_text())
        settings = saved["tutor"]
        assert saved["phi2tutor_settings_version"] == 1
        assert settings["model_name_or_path"] == DEMO_BASE
        assert settings["prompt_template"] == PHI2_QA_TEMPLATE
        assert (settings["lora_r"], settings["lora_alpha"], settings["quantization"]) == (8, 16, "none")
        assert settings["modules_to_save"] == ["embed_tokens", "lm_head"]
        assert "adapter_output_dir" not in settings and not any(k.startswith("_") for k in settings)


def test_question_option_prints_each_answer_and_its_final_answer(tiny_tutor_run, reference, capsys) -> None:
    main(
        ["chat", str(tiny_tutor_run), "--device", "cpu", "--question", HELD_OUT[0], "--question", HELD_OUT[3]]
    )
    assert capsys.readouterr().out == _block(HELD_OUT[0], reference[0]) + _block(HELD_OUT[3], reference[3])


def test_stdin_questions_one_per_line_as_json(tiny_tutor_run, reference) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "phi2tutor.cli", "chat", str(tiny_tutor_run), "--json", "--device", "cpu"],
        input="\n".join(HELD_OUT) + "\n\n",
        capture_output=True,
        encoding="utf-8",
        env=ENV,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records == [
        {"question": q, "answer": a, "final_answer": extract_answer(a)} for q, a in zip(HELD_OUT, reference)
    ]


def test_adapter_dir_config_yaml_and_peft_fallbacks_give_the_same_tutor(
    tiny_tutor_run, reference, tmp_path, capsys
):
    models_dir = tiny_tutor_run.parent.parent / "models" / "tiny-tutor"
    assert load_tutor(models_dir, device="cpu").generate(HELD_OUT) == reference
    # A run saved before phi2tutor_adapter.json existed: the settings come from its config.yaml.
    old_run = tmp_path / "old_run"
    shutil.copytree(tiny_tutor_run / "adapter", old_run / "adapter")
    shutil.copy(tiny_tutor_run / "config.yaml", old_run / "config.yaml")
    (old_run / "adapter" / TUTOR_SETTINGS_JSON).unlink()
    assert load_tutor(old_run, device="cpu").generate(HELD_OUT) == reference
    # An adapter alone without the file: base and LoRA settings from peft's adapter_config.json, said so.
    old_adapter = old_run / "adapter"
    (old_run / "config.yaml").unlink()
    assert load_tutor(old_adapter, device="cpu").generate(HELD_OUT) == reference
    assert f"has no {TUTOR_SETTINGS_JSON}" in capsys.readouterr().err


def test_bad_inputs_are_one_paragraph_and_exit_2(tiny_tutor_run, tmp_path, capsys) -> None:
    cases = [
        (["chat", str(tmp_path / "missing"), "--question", "x"], "does not exist"),
        (["chat", str(tmp_path), "--question", "x"], "holds no LoRA adapter"),
        (["chat", str(tiny_tutor_run), "--question", "x", "--temperature", "-1"], "--temperature must be"),
        (
            ["chat", str(tiny_tutor_run), "--question", "x", "--prompt_template", "Q:"],
            "has no {question} field",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_stream_pieces_join_to_generate_and_sampling_options_apply(tutor, reference) -> None:
    for question, answer in zip(HELD_OUT, reference):
        pieces = list(stream_answer(tutor, question, GenerationSettings()))
        assert "".join(pieces).strip() == answer and (len(pieces) > 1 or not answer)
    # A token limit cuts the answer; the first tokens are the greedy answer's.
    short = "".join(stream_answer(tutor, HELD_OUT[0], GenerationSettings(max_new_tokens=3))).strip()
    assert reference[0].startswith(short) and len(short) < len(reference[0])
    assert GenerationSettings(temperature=0.7, top_p=0.9).generate_kwargs() == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }


class InterruptOnFirstPiece(io.StringIO):
    """Output that sends this process a real SIGINT (what Ctrl-C does) when the first answer piece arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def write(self, text: str) -> int:
        written = super().write(text)
        if text.strip() and not self.interrupted:
            self.interrupted = True
            signal.raise_signal(signal.SIGINT)
        return written


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (KeyboardInterrupt), as a `phi2tutor chat` process has it. Earlier tests in
    this process may have left another: Lightning ignores SIGINT after a KeyboardInterrupt in fit, and its
    distributed teardown resets it to the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield previous
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_answer_not_the_session(tutor, reference, ctrl_c_raises) -> None:
    out = InterruptOnFirstPiece()
    session = ChatSession(tutor, GenerationSettings(), out=out)
    answer, final, stopped = session.answer(HELD_OUT[0])
    assert out.interrupted, f"no answer piece was written: {out.getvalue()!r}"
    assert stopped, f"the SIGINT did not stop the answer (the handler before this test: {ctrl_c_raises!r})"
    assert answer and reference[0].startswith(answer) and len(answer) < len(reference[0]), (
        answer,
        reference[0],
    )
    assert "[stopped]" in out.getvalue()
    # The same session answers the next question in full.
    assert session.answer(HELD_OUT[1]) == (reference[1], extract_answer(reference[1]), False)


def _read_until(fd: int, marker: str, seen: list[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while marker not in "".join(seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} in the chat output: {''.join(seen)[-1500:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                seen.append(os.read(fd, 4096).decode("utf-8", errors="replace"))
            except OSError:  # the child closed the terminal
                break
    text = "".join(seen)
    seen.clear()
    seen.append(text[text.index(marker) + len(marker) :] if marker in text else "")
    return text


def test_interactive_session_in_a_terminal(tiny_tutor_run, tutor) -> None:
    """Through a pseudo-terminal: multi-line input with a trailing backslash, Spanish, /reset, /quit."""
    multi_line = "Ana has 7 apples and buys 5 more.\nHow many apples does she have now?"
    expected = tutor.generate([multi_line, HELD_OUT[3]])
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat command on the terminal
        os.execve(
            sys.executable,
            [sys.executable, "-m", "phi2tutor.cli", "chat", str(tiny_tutor_run), "--device", "cpu"],
            ENV,
        )
    seen: list[str] = []
    try:
        _read_until(fd, ">>> ", seen)
        os.write(fd, b"Ana has 7 apples and buys 5 more.\\\r")
        _read_until(fd, "... ", seen)
        os.write(fd, b"How many apples does she have now?\r")
        first = _read_until(fd, ">>> ", seen)
        assert f"Final answer: {extract_answer(expected[0])}" in first
        assert expected[0].splitlines()[-1] in first
        os.write(fd, HELD_OUT[3].encode() + b"\r")
        second = _read_until(fd, ">>> ", seen)
        assert "Final answer: " in second and (expected[1].splitlines() or [""])[-1] in second
        os.write(fd, b"half a question\\\r")
        _read_until(fd, "... ", seen)
        os.write(fd, b"/reset\r")
        assert "(reset)" in _read_until(fd, ">>> ", seen)
        os.write(fd, b"/quit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_chat_help_is_fast_and_names_the_conventions() -> None:
    # The command as the console script runs it, then which modules the process had imported.
    probe = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('phi2tutor.cli', run_name='__main__')\n"
        "finally:\n"
        "    print('imported:', 'phi2tutor.chat' in sys.modules, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", probe, "chat", "--help"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert result.returncode == 0 and "--question" in result.stdout and "backslash" in result.stdout
    assert "imported: True False" in result.stderr, result.stderr  # chat's parser, and no torch
    assert time.monotonic() - started < 20
