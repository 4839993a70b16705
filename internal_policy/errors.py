"""The one exception type users see: a problem and its fix, printed as a single line by the CLI."""


class IPolicyError(Exception):
    """Bad input or a failed precondition. The message names the problem and ends with "Fix: ...".

    A message names an option by its Python parameter in backticks (`max_new_tokens`); the CLI shows the same message
    with the flag instead (--max-new-tokens), so that library and command line each speak their user's language.
    """
