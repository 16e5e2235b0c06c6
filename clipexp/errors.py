"""Errors a user can fix: one base class, :class:`UserError`, whose message is one line (what is wrong,
where, what to do). The command line, the Hydra task and the export print that line and exit with a code;
any other exception is a bug and keeps its traceback.

It lives below everything (the library raises these too), so no package imports a higher layer for them.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """An error the user can fix (a config value, a file, the machine): printed as one line, never a traceback.

    ``exit_code``: 2 for a usage error (the default), 1 for a run that started and failed (a non-finite loss,
    a full disk)."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value a user set is wrong. The message is one line: key, value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
