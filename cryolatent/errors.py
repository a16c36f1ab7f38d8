"""User-facing errors.

Every problem caused by the user's input (a missing stack, a bad column, an unknown pixel size)
is raised as :class:`CryolatentError` with a one-line message that names the file, particle or
column and says what is wrong. The CLI prints it as ``error: <message>`` and exits with status
1, without a traceback (unless ``--debug``).
"""

from __future__ import annotations


class CryolatentError(Exception):
    """An error in the user's input or environment, reported as one line without a traceback."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class InputError(CryolatentError):
    """A particle file, table or image that cannot be used as it is."""
