"""Errors a user can act on.

Every failure that is the user's input (a bad file, a bad flag, a cache that
does not match) is raised as a ``UserError`` whose message is one line naming
the file, record and field. The CLI prints it as ``error: ...`` and exits 1;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(UserError):
    """An invalid configuration value, unknown key or malformed config file."""


class CacheMismatch(UserError):
    """An existing output made with other settings; ``detail`` says what differs, without the stage's own advice
    (``lldm-dpo run`` gives advice that works for ``run``)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail
