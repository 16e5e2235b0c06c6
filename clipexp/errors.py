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


class UsageError(UserError, ValueError):
    """A command line that cannot be read (Hydra's grammar, an unknown option): the message is the line."""


class DeviceError(UserError, RuntimeError):
    """The requested device or precision is not available here."""


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded (no hub access, a missing or damaged folder): what to use instead."""


class CheckpointError(UserError, ValueError):
    """A checkpoint ``trainer.resume`` (or ``clipexp upgrade`` / ``export``) cannot use: the file and what to do."""


class BatchTooLargeError(UserError, RuntimeError):
    """Even a micro-batch of one sample does not fit: what to change."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf: the step, the last good checkpoint, what to change."""

    exit_code = 1


class WriteError(UserError, OSError):
    """A file could not be written (a full disk, a quota, a read-only folder): what, where, what is kept and
    the command that finishes the work once it can be written."""

    exit_code = 1
