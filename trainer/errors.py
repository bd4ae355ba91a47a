"""Errors that reach the user as one line saying what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a file. The CLI prints it and exits 2."""


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid."""


class StorageError(UserError):
    """A transfer failed: unreachable source, HTTP error, missing object or bad checksum."""


class WeightsFileError(UserError):
    """A weights file is missing, unreadable, or not in the Keras-2 h5 layout by layer name."""


class ClusterError(UserError):
    """The cluster refused or failed a job: an API error or a failed TFJob (the message says)."""
