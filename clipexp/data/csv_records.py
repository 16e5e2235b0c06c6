"""A CSV file as records that account for every physical line, with a quote that runs away named.

Python's ``csv`` module lets a quoted field hold line breaks (valid CSV: a caption over several lines).
The same rule makes one unclosed quote swallow every following line into one field, silently: the rows
on those lines vanish. :func:`read_records` keeps the valid case and names the other: a record whose
quoted field runs over a line that is a row of its own (the caller's ``is_row`` says what a row looks
like: a line naming an image) is reported by the line it starts on, with the line where the quote
opened, and reading goes on at that row. A quote still open at the end of the file is reported too.
So every physical line belongs to exactly one record: a row, a reported record, or a blank line.

The quoting rules are those of ``csv.reader`` with the default dialect (``"`` quotes a field that starts
with it; ``""`` inside it is one quote; a quote elsewhere in a field is a literal character).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

from clipexp.errors import UserError

QUOTE_ADVICE = 'close the quote, or write a quote inside a quoted field as ""'
PREVIEW = 80  # characters of a swallowed line quoted in a message


@dataclass
class Record:
    """One record: ``line`` is the 1-based line it starts on, ``end`` the 0-based index just past its last line.
    ``problem`` is set when the record is no row (a runaway quote): its ``cells`` are not to be used."""

    line: int
    end: int
    cells: List[str]
    problem: Optional[str] = None


class CSVSyntaxError(UserError, ValueError):
    """``csv.reader`` refused a line (a NUL byte, a field over the size limit): ``line`` is 1-based."""

    def __init__(self, line: int, message: str):
        self.line = line
        super().__init__(message)


def split_lines(text: str) -> List[str]:
    """The physical lines of ``text`` as ``csv`` counts them (``\\n``, ``\\r\\n`` or ``\\r``), endings kept."""
    return io.StringIO(text, newline="").readlines()


def first_cells(line: str, delimiter: str) -> List[str]:
    """The cells of one line read on its own (a quote left open ends with the line)."""
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return []


def _preview(line: str) -> str:
    text = line.rstrip("\r\n")
    return text if len(text) <= PREVIEW else text[: PREVIEW - 3] + "..."


def _runaway_quote(lines: List[str], start: int, end: int, delimiter: str,
                   is_row: Callable[[str], bool]) -> Optional[Tuple[int, Optional[int]]]:
    """``(index of the line the quote opened on, index of the first swallowed row or None at the end of the
    file)`` when the record ``lines[start:end]`` holds a quote that runs over another row or past the end of
    the file; None for a record that is a row (its line breaks inside closed quotes)."""
    quoted, after_quote, at_field_start, opened = False, False, True, start
    for j in range(start, end):
        if j > start and quoted and is_row(lines[j]):
            return opened, j
        for ch in lines[j]:
            if quoted:
                if after_quote:  # the previous character was a quote inside a quoted field
                    after_quote = False
                    if ch == '"':
                        continue  # "" : one literal quote, still quoted
                    quoted = False  # the field's quote closed; this character follows it
                elif ch == '"':
                    after_quote = True
                    continue
                else:
                    continue
            if ch == delimiter:
                at_field_start = True
            elif ch in "\r\n":
                at_field_start = True
            elif ch == '"' and at_field_start:
                quoted, opened, at_field_start = True, j, False
            else:
                at_field_start = False
    if quoted and not after_quote:
        return opened, None
    return None


def _lines_from(lines: List[str], pos: int) -> Iterator[str]:
    for k in range(pos, len(lines)):
        yield lines[k]


def read_records(lines: List[str], pos: int, delimiter: str, is_row: Callable[[str], bool]) -> Iterator[Record]:
    """The records of ``lines[pos:]`` (see the module doc); blank lines are records with no cells.

    Raises :class:`CSVSyntaxError` where ``csv.reader`` refuses a line."""
    while pos < len(lines):
        reader = csv.reader(_lines_from(lines, pos), delimiter=delimiter)
        base, prev, restart = pos, 0, None
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise CSVSyntaxError(base + reader.line_num, str(err)) from None
            start, end = base + prev, base + reader.line_num
            prev = reader.line_num
            if end - start > 1 or any("\n" in c or "\r" in c for c in cells):
                runaway = _runaway_quote(lines, start, end, delimiter, is_row)
                if runaway is not None:
                    opened, swallowed = runaway
                    where = "here" if opened == start else f"on line {opened + 1}"
                    if swallowed is None:
                        why = f"a quote opened {where} is never closed (the file ends inside it)"
                    else:
                        why = (f"a quote opened {where} is not closed before line {swallowed + 1}, which holds another row "
                               f"({_preview(lines[swallowed])!r})")
                    yield Record(start + 1, swallowed if swallowed is not None else end, cells, f"{why}; {QUOTE_ADVICE}")
                    restart = swallowed
                    break
            yield Record(start + 1, end, cells)
        if restart is None:
            return
        pos = restart
