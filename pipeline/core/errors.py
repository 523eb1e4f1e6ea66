"""One exception hierarchy (Polygraphy separates user errors from bugs).

A :class:`UserError` is something the user can fix: it names the stage, the
offending input and the fix. The CLI prints it without a traceback and exits 2.
Anything else is a bug in vitrim and keeps its traceback.
"""
from __future__ import annotations


class VitrimError(Exception):
    """Base class of every error vitrim raises on purpose."""


class UserError(VitrimError):
    """Bad input: a config, a file, a budget. Fixable by the user."""

    def __init__(self, stage: str, what: str, fix: str | None = None):
        self.stage, self.what, self.fix = stage, what, fix
        msg = f"[{stage}] {what}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)


class InternalError(VitrimError):
    """An invariant inside vitrim broke. Please report it."""
