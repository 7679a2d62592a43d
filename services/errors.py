"""Errors shared by every role.

A :class:`UserError` is a problem with what the user gave us (a flag, a config file, a
checkpoint, a prompt). It carries a one-line message that names the offending field or tensor;
the CLI prints it without a traceback and exits non-zero, and the servers map it to a 400 or
INVALID_ARGUMENT.
"""


class UserError(ValueError):
    """Bad input from the user; the message is one line and names the problem."""


class ConfigError(UserError):
    """A config file or config dataclass field is invalid."""


class CheckpointError(UserError):
    """A checkpoint is missing tensors, has unexpected ones, or has wrong shapes/dtypes."""
