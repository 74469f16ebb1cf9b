"""The error search/ raises for bad input: a one-line message naming the problem and the fix.

models/ and hw_profiles/ sit below search/ and do not import it, so they raise their own
ValueError subclasses (`models.errors.ModelError`, `hw_profiles.ProfileError`); the CLI
prints all three the same way (`search.cli.user_errors`).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or an impossible request. The CLI prints `error: <message>` and exits 2.

    The message is one line: what is wrong (the thing and its value) and what to do.
    """
