"""Exceptions that the CLI turns into one-line messages and exit codes."""


class SpotwatchError(Exception):
    """A runtime failure: reported in one line, exit code 1."""

    exit_code = 1


class ConfigError(SpotwatchError):
    """A usage or configuration error: reported in one line, exit code 2."""

    exit_code = 2
