"""Errors a user can cause and fix: scripts print their one-line messages and exit with status 2."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """A bad path, flag, file or value; the message names the fix, one line per problem."""


def raise_problems(problems):
    """Raise one UserError listing every problem (one-line strings), if there are any."""
    problems = list(problems)
    if problems:
        raise UserError("\n".join(problems))


def problems_of(*checks):
    """Return the problems (message lines) of the UserErrors that the checks (callables) raise, in order."""
    problems = []
    for check in checks:
        try:
            check()
        except UserError as err:
            problems += str(err).splitlines()
    return problems


@contextmanager
def exit_on_user_error(show=True):
    """Turn a UserError into 'error: …' lines on stderr (when show) and exit status 2, without a traceback."""
    try:
        yield
    except UserError as err:
        if show:
            for line in str(err).splitlines():
                print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
