"""The error a user's settings cause. The ``melanoma`` command reports it, and the data and
MLflow errors, in one line (exit 2, ``--verbose`` adds the traceback); any other exception is a
bug and surfaces with its traceback."""


class SettingsError(ValueError):
    """A setting (a flag, an MLproject parameter, a model name) that makes no sense; the message
    names it and what it may be."""
