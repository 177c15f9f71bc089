"""User-facing errors.

A :class:`UserError` is raised for bad input (wrong file, bad flag, malformed config). Entry scripts
catch it and print its one-line message without a stack trace; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message names the file/flag/key, what was found and what was expected."""
