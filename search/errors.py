"""The one error type users see: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits 2.

    The message is one line: what is wrong (the thing and its value) and what to do.
    """
