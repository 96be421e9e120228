"""The one exception type users see: every refusal is a LoraLegoError with a one-line message."""


class LoraLegoError(Exception):
    """A problem with the user's input or environment that the user can act on.

    The message is one line and names the file, the tensor or config key, and the problem; the CLI prints
    it without a traceback.
    """
