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

    def __init__(self, stage: str, what: str | None = None, fix: str | None = None):
        if what is None:
            # One-argument form: torch's DataLoader re-raises a worker's exception as
            # ``type(e)(formatted_traceback)``; keep only the original message.
            msg = stage.rsplit("UserError: ", 1)[-1].strip()
            self.stage, self.what, self.fix = "data", msg, None
            super().__init__(msg)
            return
        self.stage, self.what, self.fix = stage, what, fix
        msg = f"[{stage}] {what}"
        if fix:
            msg += f"\n  fix: {fix}"
        super().__init__(msg)

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.stage, self.what, self.fix))


class InternalError(VitrimError):
    """An invariant inside vitrim broke. Please report it."""


class Interrupted(VitrimError):
    """SIGTERM/SIGINT arrived inside a training loop; a checkpoint was saved first.

    The CLI exits ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), as a shell would.
    """

    def __init__(self, signum: int, path):
        self.signum, self.path = int(signum), path
        super().__init__(f"stopped by signal {self.signum}; checkpoint saved to {path} (rerun the same command "
                         "to continue; `vitrim finetune` takes --resume)")

    def __reduce__(self):
        return (type(self), (self.signum, self.path))
