"""User-facing errors.

A :class:`UserError` is raised for bad input (wrong file, bad flag, malformed config). Entry scripts
catch it and print its one-line message without a stack trace; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message names the file/flag/key, what was found and what was expected."""


class RunInterrupted(Exception):
    """A run stopped on a signal after saving; entry scripts print the message and exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
