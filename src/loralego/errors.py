"""The one exception type users see: every refusal is a LoraLegoError with a one-line message."""


class LoraLegoError(Exception):
    """A problem with the user's input or environment that the user can act on.

    The message is one line and names the file, the tensor or config key, and the problem; the CLI prints
    it without a traceback. Messages quote names read from untrusted files, so control characters
    (newlines, terminal escape sequences) are escaped here, once for every caller.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(one_line(arg) if isinstance(arg, str) else arg for arg in args))


def one_line(text: str) -> str:
    """``text`` with every non-printable character written as its Python escape (``\\n``, ``\\x1b``)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
