"""Errors a user can cause and fix: scripts print their one-line message and exit non-zero."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """A bad path, flag, file or value; the message names the fix."""


@contextmanager
def exit_on_user_error():
    """Turn a UserError into one line on stderr and exit status 2, without a traceback."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
