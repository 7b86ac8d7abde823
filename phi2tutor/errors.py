"""User-facing errors: bad input that the CLI prints as one clear paragraph, no traceback."""


class Phi2TutorError(Exception):
    """An error caused by the user's input (a file, a line, an option), with what to do about it.

    The CLI catches it and prints only its message; everything else is a bug and keeps its
    traceback.
    """
