"""Errors a user can cause (bad paths, files, flags).

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file, column or flag at fault."""


class DataError(UserError, ValueError):
    """A data file that is missing, damaged or of the wrong schema. Message: ``<file>: <column>: <what>``."""
