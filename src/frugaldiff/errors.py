"""The one exception type that frugaldiff shows to users as a single line, and a repr short enough for one."""

from __future__ import annotations

import reprlib
from typing import Any


class FrugalError(Exception):
    """A user-facing error: its message names the problem and the fix, in one line."""


def short_repr(value: Any) -> str:
    """repr of ``value`` cut to a readable length and depth, for one-line messages."""
    cut = reprlib.Repr()
    cut.maxlevel, cut.maxlist, cut.maxstring, cut.maxother, cut.maxlong = 3, 6, 60, 60, 40
    return cut.repr(value)
