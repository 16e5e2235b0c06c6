"""What is wrong with a data source: one :class:`Problem` per row or file, and the error that lists them.

Every source, the splitter and the validator raise :class:`DataValidationError`; it sits below them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from clipexp.errors import UserError


class DataValidationError(UserError, ValueError):
    """Rows of a data source are unusable. The message lists every problem, one per line (a report: the
    one exception to a :class:`~clipexp.errors.UserError`'s one line, so that every bad row is named at once).

    ``problems`` holds the :class:`Problem` records (empty when the error was re-raised from a
    DataLoader worker, which keeps only the message).
    """

    def __init__(self, message: str, problems: Optional[Sequence["Problem"]] = None, source: Optional[str] = None):
        super().__init__(message)
        self.problems = list(problems or [])
        self.source = source

    @classmethod
    def from_problems(cls, source: Union[str, Path], problems: Sequence["Problem"], hint: bool = True) -> "DataValidationError":
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''} in {source}"
        if hint:
            head += ' (fix these rows, or set on_error="skip" / data.on_error=skip to drop them)'
        return cls("\n".join([head] + [f"  {p}" for p in problems]), problems, str(source))


def one_problem(source: Union[str, Path], where: str, message: str) -> DataValidationError:
    """A source-level error (unreadable file, missing column, ...): one problem, no skip hint."""
    return DataValidationError.from_problems(source, [Problem(where, message)], hint=False)


@dataclass(frozen=True)
class Problem:
    """One problem: ``where`` is ``file:line`` (or a file), ``message`` what is wrong."""

    where: str
    message: str
    order: int = 0  # sort key: the row's position in its source

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"
