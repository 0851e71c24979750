"""CSV that a spreadsheet opens as data, never as formulas (CWE-1236, "CSV injection").

Excel, LibreOffice and Google Sheets evaluate a cell that starts with ``=``,
``+``, ``-`` or ``@`` (and, in some versions, a tab or carriage return) as a
formula, so an identifier or free-text value like ``=HYPERLINK(...)`` in an
exported file would run when someone opens it.  Every CSV the node writes goes
through `csv_text`, which prefixes such text cells with an apostrophe, the
spreadsheet convention for "this is text".

Numbers stay numbers: an int/float cell, or a text cell that is a plain
decimal number such as ``-1.25``, is written unchanged (a spreadsheet reads it
as a number, not a formula).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def neutralise_formula(value: object) -> object:
    """``value`` as a spreadsheet will read it as data: text that would start a formula gets a leading ``'``."""
    if not isinstance(value, str) or not value.startswith(FORMULA_PREFIXES):
        return value
    if _PLAIN_NUMBER.fullmatch(value):
        return value
    return "'" + value


def csv_text(rows: Iterable[Mapping[str, object]], fieldnames: Sequence[str]) -> str:
    """A CSV document (header + rows, ``\\n`` line ends) with every cell and header passed through `neutralise_formula`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([neutralise_formula(name) for name in fieldnames])
    for row in rows:
        writer.writerow([neutralise_formula(row.get(name, "")) for name in fieldnames])
    return buffer.getvalue()
