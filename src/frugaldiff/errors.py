"""The one exception type that frugaldiff shows to users as a single line."""


class FrugalError(Exception):
    """A user-facing error: its message names the problem and the fix, in one line."""
