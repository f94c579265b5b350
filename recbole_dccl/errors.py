"""Errors a user can act on. ``run_recbole_dccl.py`` prints their message and exits with status 2, no traceback.

Both subclass the built-in error Python code would catch for them, so callers of ``run_recbole_dccl`` need not
know these names.
"""


class InputError(ValueError):
    """A setting, dataset or file that cannot be used; the message names it, the bad value and what is valid."""


class NonFiniteLoss(FloatingPointError):
    """A training loss became nan or inf; the message names the round and phase and the last good run state."""
