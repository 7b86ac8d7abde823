"""Reading the user's text files (data, predictions, problems) once, with errors that name the file and line.

Pure Python: the text-only commands (``phi2tutor score``) use it without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from phi2tutor.errors import Phi2TutorError


def require_file(path: str | os.PathLike[str], what: str, expected: str) -> Path:
    """``path`` as a Path, once it is known to be an existing file (not a directory).

    Raises:
        Phi2TutorError: it does not exist or is a directory; the message names it and what it must be.
    """
    path = Path(path)
    if path.is_dir():
        raise Phi2TutorError(f"The {what} path {path} is a directory, not a file: it must be {expected}.")
    if not path.exists():
        raise Phi2TutorError(
            f"The {what} file {path} does not exist (relative paths start from {Path.cwd()}). Check the "
            f"path; the file must be {expected}."
        )
    return path


def read_text(path: str | os.PathLike[str], what: str, expected: str) -> str:
    """The whole file as text: UTF-8, a leading byte-order mark dropped (Windows editors write one).

    Args:
        path: the file.
        what: what the file holds, for messages ("predictions", "data").
        expected: what the file should look like, for messages ("JSON Lines, one object per line").

    Raises:
        Phi2TutorError: the file does not exist, is a directory, cannot be read or is not UTF-8; the message
            names the file (and, for a bad byte, its line) and what to do.
    """
    path = require_file(path, what, expected)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise Phi2TutorError(
            f"Cannot read the {what} file {path}: {error.strerror or error}. Check its permissions."
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise Phi2TutorError(
            f"{path}, line {line}: byte 0x{data[error.start]:02x} is not UTF-8 text, so this is not a UTF-8 "
            f"file (perhaps Latin-1, or not text at all). The {what} file must be {expected} in UTF-8: "
            "re-save it as UTF-8 (for example `iconv -f latin1 -t utf-8 IN > OUT`)."
        ) from None


def text_lines(text: str) -> list[str]:
    """The file's lines, numbered as an editor numbers them: split on "\\n" only (splitlines() also breaks
    at U+2028 and other separators that JSON strings may hold)."""
    return text.split("\n")
