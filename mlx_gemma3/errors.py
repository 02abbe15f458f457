"""The one exception type the package raises for bad input; CLIs print it as one line.

Internal: not part of the public API, which docs/api.md lists."""


class Gemma3Error(ValueError):
    """Bad input to mlx_gemma3: the message says what, where, and what to do."""
