"""The one exception type for bad user input.

Entry points turn it into a single ``error: <what> (<which file/key>)`` line and exit code 2
(see :mod:`dreammix.cli`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DreamMixError(Exception):
    """Bad input from the user: a missing file, a malformed image, an invalid config value."""

    def __init__(self, what: str, where: str | None = None):
        self.what = what
        self.where = where
        super().__init__(f"{what} ({where})" if where else what)
