"""One exception hierarchy (Polygraphy separates user errors from bugs).

A :class:`UserError` is something the user can fix: it names the stage, the
offending input and the fix. The CLI prints it without a traceback and exits 2.
A :class:`GateError` is a release gate that decided "fail" (Polygraphy's
``--save-results`` and MLflow's ``validate_evaluation_results`` convention: the
process fails by itself and the evidence, ``verdict.json``, stays on disk); its
class carries the exit code. Anything else is a bug in vitrim and keeps its traceback.

Exit codes of the ``vitrim`` command (stable; a CI job may branch on them):

====  ===========================================================================
0     every gate passed
1     an internal error (a bug in vitrim: please report it with the traceback)
2     user error: a config, a file, a budget, a signature, an I/O fault (the message names the fix)
3     accuracy/parity gate: the engine diverges from PyTorch (:class:`AccuracyGateError`)
4     latency gate: the delivered latency misses the budget, with ``export.require_budget``
5     regression gate: the candidate is slower or less accurate than the baseline release
6     inconclusive: no gate failed, but one could not decide (too few images for the accuracy
      tolerance, or a machine too noisy for the latency threshold): evaluate more images or rerun on
      a quiet machine (:class:`InconclusiveError`)
130   interrupted (SIGINT); 143 terminated (SIGTERM), after a checkpoint was saved
====  ===========================================================================
"""
from __future__ import annotations

import importlib.metadata as md


class VitrimError(Exception):
    """Base class of every error vitrim raises on purpose."""


class UserError(VitrimError):
    """Bad input: a config, a file, a budget. Fixable by the user."""

    def __init__(self, stage: str, what: str | None = None, fix: str | None = None):
        if what is None:
            # One-argument form: torch's DataLoader re-raises a worker's exception as
            # ``type(e)(formatted_traceback)``; keep only the original message.
            msg = stage.rsplit(f"{type(self).__name__}: ", 1)[-1].strip()
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


class IOFault(UserError):
    """A write that the filesystem refused (read-only, no space left, permission denied, a missing parent):
    exit 2 like bad input, naming the path, the cause and the fix (:func:`vitrim.pipeline.core.io.io_fault`)."""

    def __init__(self, stage: str, what: str, fix: str | None = None, path: str | None = None,
                 errno_: int | None = None):
        super().__init__(stage, what, fix)
        self.path, self.errno = path, errno_

    def __reduce__(self):
        return (type(self), (self.stage, self.what, self.fix, self.path, self.errno))


class UnreachableBudget(UserError):
    """A budget below what a strategy's plans can reach (its floors, or where its search stopped). A benchmark
    that bisects budgets treats it as "this method does not reach that point"; every other UserError is shown."""

    def __init__(self, what: str, fix: str | None = None):
        super().__init__("search", what, fix)

    def __reduce__(self):
        return (type(self), (self.what, self.fix))


EXIT_PASS = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_ACCURACY = 3
EXIT_LATENCY = 4
EXIT_REGRESSION = 5
EXIT_INCONCLUSIVE = 6
EXIT_CODES = {EXIT_PASS: "pass", EXIT_INTERNAL: "internal error", EXIT_USER: "user error",
              EXIT_ACCURACY: "accuracy/parity gate", EXIT_LATENCY: "latency gate", EXIT_REGRESSION: "regression gate",
              EXIT_INCONCLUSIVE: "inconclusive"}


class GateError(VitrimError):
    """A release gate failed. Subclasses fix :attr:`exit_code`; ``report`` holds the gate's figures."""

    exit_code = EXIT_INTERNAL  # only the subclasses below are raised

    def __init__(self, message: str, report: dict | None = None):
        self.report = report if report is not None else {}
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.report))


class AccuracyGateError(GateError):
    """The engine's outputs or accuracy diverge from the reference beyond the tolerances (exit 3)."""

    exit_code = EXIT_ACCURACY


class LatencyGateError(GateError):
    """The delivered engine's measured latency misses the requested budget (exit 4)."""

    exit_code = EXIT_LATENCY


class RegressionGateError(GateError):
    """A candidate release is slower or less accurate than its baseline release (exit 5)."""

    exit_code = EXIT_REGRESSION


class InconclusiveError(GateError):
    """No gate failed, but one could not decide with confidence (exit 6): too few images for the
    accuracy tolerance, or a machine too noisy for the latency threshold."""

    exit_code = EXIT_INCONCLUSIVE


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


def install_hint(extra: str) -> str:
    """The fix for a missing optional extra, for a source install (vitrim is not on the package index).

    Names ``pip install -e '.[extra]'`` (from the vitrim checkout) and the extra's own packages, read from the
    installed distribution's metadata so the hint never drifts from ``pyproject.toml``.
    """
    try:
        reqs = md.requires("vitrim") or []
    except md.PackageNotFoundError:
        reqs = []
    marker = f'extra == "{extra}"'
    pkgs = [r.split(";")[0].strip() for r in reqs if marker in r]
    alone = f", or pip install {' '.join(repr(p) if '[' in p or '>' in p else p for p in pkgs)}" if pkgs else ""
    return f"pip install -e '.[{extra}]' from the vitrim checkout{alone}"
