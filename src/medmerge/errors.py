"""Errors that reach the user: each says what is wrong, where, and what to do."""


class MedmergeError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class InputError(MedmergeError):
    """A model folder, checkpoint or tensor is missing, corrupt or inconsistent."""


class ConfigError(MedmergeError):
    """The merge configuration is invalid."""


class OutputExistsError(MedmergeError):
    """The output folder exists and --force was not given."""
