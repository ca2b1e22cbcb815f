"""The one exception type that user mistakes raise.

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class TilecoreError(Exception):
    """A user-facing error: the message names the thing at fault and what was expected."""
