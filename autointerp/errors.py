"""One error type for bad user input: the CLI prints its message on one line and exits non-zero."""


class AutointerpError(Exception):
    """A user-facing error: the message names the file/field and what was expected."""


class ConfigError(AutointerpError):
    """Bad configuration or input (files, fields, shapes, options)."""
