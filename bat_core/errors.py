"""Errors raised by bat-sampling. Every message says what was wrong and what to do."""


class BatError(ValueError):
    """Bad input or configuration given to bat-sampling (a caller's mistake, never a solver hiccup)."""
