"""The project's exception classes for user mistakes.

A command line, config or input that does not fit raises one of these, with a message that
names the thing (file, key, sample) and the fix. The command-line tools print them as one line
and exit with status 2 (``--debug`` shows the traceback); any other exception is a bug and keeps
its traceback. Both classes derive from the built-in exception they replace, so
``except ValueError`` / ``except FileNotFoundError`` callers keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in a command line, config or input; the message names it and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder that the command line or config names does not exist."""
