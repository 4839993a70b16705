"""The one exception type users see: a problem and its fix, printed as a single line by the CLI."""


class IPolicyError(Exception):
    """Bad input or a failed precondition. The message names the problem and the fix."""
