"""The error a user's wrong config value raises: one line naming the key, the value and what is allowed.

It lives below everything (the library raises it too), so no package has to import the config layer for it.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value a user set is wrong. The message is one line: key, value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
