"""User-facing errors.

Anything the user can cause (a bad file, a bad setting, a checkpoint of another model) raises a subclass
of :class:`MulanError` with a one-line message. The command line prints ``mulan: error: <message>`` and
exits with status 2; it never shows a traceback for these.
"""


class MulanError(Exception):
    """Base class of errors caused by input, not by a bug."""


class ConfigError(MulanError):
    """A bad preset, override or configuration value."""


class DataError(MulanError):
    """A missing, corrupt or mismatched dataset."""


class CheckpointError(MulanError):
    """A missing, truncated, untrusted or mismatched checkpoint."""


class OutputError(MulanError):
    """An output location that cannot be written."""
