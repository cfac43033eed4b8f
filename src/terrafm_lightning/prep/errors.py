"""Errors of the write path; each message names the file, folder, tile or store concerned.

The ``terrafm-data`` CLI prints them as one line (no traceback) and exits with status 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """A source file or folder is unusable or the inputs do not pair up; the message names it."""


class PrepError(RuntimeError):
    """A prep run stopped on bad input or a failed worker; the message names file and tile."""
