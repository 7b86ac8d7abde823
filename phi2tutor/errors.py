"""User-facing errors: bad input that the CLI prints as one clear paragraph, no traceback."""


class Phi2TutorError(Exception):
    """An error caused by the user's input (a file, a line, an option), with what to do about it.

    The CLI catches it and prints only its message; everything else is a bug and keeps its
    traceback.
    """


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty),
    for quoting a library's error inside one of ours."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else type(error).__name__
    return text[:limit] if limit else text


EXPLANATION_ATTRIBUTE = "phi2tutor_explanation"


def attach_explanation(error: BaseException, text: str) -> None:
    """Give a library's error (e.g. CUDA out of memory) our explanation without replacing it: a callback
    that raised its own error instead would stop Lightning's other exception hooks and the teardown."""
    setattr(error, EXPLANATION_ATTRIBUTE, text)


def explanation(error: BaseException) -> str | None:
    """The explanation attached to ``error``, if any (the CLI prints it instead of a traceback)."""
    return getattr(error, EXPLANATION_ATTRIBUTE, None)


def check_option(owner: str, name: str, value: object, valid: bool, requirement: str) -> None:
    """Raise a Phi2TutorError naming ``owner``'s option ``name`` when ``valid`` is False.

    Constructors call it, so a bad value stops the command while the config is read, in one paragraph,
    before a library deep inside fails on it (torch's DataLoader on a negative batch size, peft on r=0).

    Args:
        owner: the option's prefix as the user writes it ("data", "model", "GPUMemoryProfiler").
        name: the option.
        value: its value.
        valid: whether the value is acceptable.
        requirement: what it must be ("a positive integer"), completing "it must be ...".
    """
    if not valid:
        raise Phi2TutorError(
            f"{owner}.{name}={value!r} is invalid: it must be {requirement}. Fix the option."
        )
