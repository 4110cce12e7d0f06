"""The one exception type for user mistakes.

Everything a user can get wrong (a bad flag value, a missing model directory, an unsupported
architecture, malformed data) raises `LayerSkipError` with a one-line message. The CLI prints that
line and exits non-zero; it never shows a traceback for these. Bugs stay ordinary exceptions.
"""


class LayerSkipError(ValueError):
    """A user-facing error: the message is one line that says what is wrong and how to fix it."""
