"""``verdict.json``: one machine-readable answer per run or release directory.

A CI job reads one file to know whether a build may ship, and why not: every gate
that decided the exit code, with the measured figure, the threshold, the
comparison, pass/fail and the exit code it gave. It follows Polygraphy's
``--save-results`` and MLflow's ``validate_evaluation_results``: a failing gate
fails the process by itself (the exit code of its :class:`GateError` class) and
the evidence stays on disk, because the verdict is written *before* the error is
raised.

Format (schema 2)::

    {"schema": 2, "kind": "export" | "run" | ..., "created": ISO-8601,
     "passed": bool, "outcome": "pass" | "fail" | "inconclusive",
     "exit_code": int, "exit_meaning": "pass" | "accuracy/parity gate" | ... | "inconclusive",
     "error": str | null,                   # the failing gate's message
     "gates": [{"gate": "parity" | "int8_vs_fp32" | "latency" | "regression" | ...,
                "check": str, "subject": str | null, "output": str | null,
                "measured": float | null,   # null: not finite (NaN/Inf in an output)
                "threshold": float, "op": "<=" | ">=" | "abs<=", "unit": str | null,
                "outcome": "pass" | "fail" | "inconclusive",   # statistical gates may not decide
                "passed": bool, "exit_code": int,   # 0 when passed, the gate's code (3, 4, 5) when failed, 6 undecided
                "detail": str | null}],
     "info": {...}}                         # figures that decided nothing (e.g. int8 against the fp32 engine)

Every entry in ``gates`` is enforced; ``passed`` is all of them, and ``exit_code``
is the lowest code among the failed ones (accuracy 3 before latency 4 before
regression 5: the process stops at the first gate it fails, in that order). When
nothing failed but a statistical gate could not decide (an accuracy interval that
straddles the allowed loss, a latency ratio within the A/A control's noise of its
threshold), the verdict is ``inconclusive`` with exit 6: a CI job reruns on a quiet
runner or evaluates more images, and never ships it as a pass.
Figures that are only reported go to ``info``, so ``all(g["passed"] for g in
gates)`` is always the verdict.

Other gates (the regression gate of ``vitrim compare``) add their entries to an
existing verdict with :func:`merge_gates` and raise with :func:`raise_for`.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from pathlib import Path
from typing import Iterable, Optional

from vitrim.pipeline.core.config import pct
from vitrim.export.stats import FAIL, INCONCLUSIVE, OUTCOMES, PASS
from vitrim.pipeline.core.errors import (EXIT_ACCURACY, EXIT_CODES, EXIT_INCONCLUSIVE, EXIT_LATENCY, EXIT_PASS,
                                         AccuracyGateError, GateError, InconclusiveError, InternalError,
                                         LatencyGateError, RegressionGateError, UserError)
from vitrim.pipeline.core.io import atomic_write_json, read_json
from vitrim.pipeline.core.rundir import RunDir

VERDICT_SCHEMA = 2
_OPS = ("<=", ">=", "abs<=")
_ERRORS = {c.exit_code: c for c in (AccuracyGateError, LatencyGateError, RegressionGateError, InconclusiveError)}


def _finite(v) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def gate(gate: str, check: str, measured, threshold: float, op: str, exit_code: int, *, subject: str | None = None,
         output: str | None = None, unit: str | None = None, detail: str | None = None,
         outcome: str | None = None, interval: Optional[list] = None) -> dict:
    """One verdict entry; its outcome is decided here, from the figure, the threshold and ``op``.

    A measured figure that is ``None`` or not finite fails (NaN/Inf never passes a gate). A
    statistical gate passes its own ``outcome`` (pass, fail or inconclusive, decided on an
    ``interval`` or an A/A control rather than on the figure alone); an inconclusive entry
    carries exit code 6.
    """
    if op not in _OPS:
        raise InternalError(f"verdict gate {gate}/{check}: unknown comparison {op!r}")
    m = _finite(measured)
    if outcome is None:
        if m is None:
            ok = False
        elif op == "<=":
            ok = m <= threshold
        elif op == ">=":
            ok = m >= threshold
        else:
            ok = abs(m) <= threshold
        outcome = PASS if ok else FAIL
    elif outcome not in OUTCOMES:
        raise InternalError(f"verdict gate {gate}/{check}: unknown outcome {outcome!r}")
    code = {PASS: EXIT_PASS, FAIL: int(exit_code), INCONCLUSIVE: EXIT_INCONCLUSIVE}[outcome]
    entry = {"gate": gate, "check": check, "subject": subject, "output": output, "measured": m,
             "threshold": float(threshold), "op": op, "unit": unit, "outcome": outcome, "passed": outcome == PASS,
             "exit_code": code, "detail": detail}
    if interval is not None:
        entry["interval"] = [float(v) for v in interval]
    return entry


def parity_gates(rep: dict, subject: str | None = None) -> list[dict]:
    """The parity gate's checks as verdict entries, from ``parity.json`` (:meth:`ParityReport.to_dict`).

    Per output: shape, non-finite values, elementwise ``|e - r| <= atol + rtol*|r|``, the worst image's
    and the mean relative L2 error, the probability divergence (quantile and mean); then the
    predicted-class distribution, top-1 agreement, and the accuracy loss with its McNemar interval
    (pass, fail or inconclusive). The outcome of each follows :mod:`vitrim.export.parity`'s own decision.
    """
    tol, out = rep["tolerances"], []
    for name, o in rep["outputs"].items():
        kw = dict(subject=subject, output=name)
        if o.get("shape_mismatch"):
            out.append(gate("parity", "shape", None, 0, "<=", EXIT_ACCURACY, detail=o["shape_mismatch"], **kw))
            continue
        nonfinite = o["nonfinite_engine"] + o["nonfinite_reference"]
        out.append(gate("parity", "non_finite", nonfinite, 0, "<=", EXIT_ACCURACY, unit="elements",
                        detail=f"NaN/Inf: {o['nonfinite_engine']} in the engine's output, "
                               f"{o['nonfinite_reference']} in the reference's, of {o['elements']}", **kw))
        out.append(gate("parity", "elementwise", o["mismatched"], 0, "<=", EXIT_ACCURACY, unit="elements",
                        detail=f"elements outside atol {tol['atol']:g} + rtol {tol['rtol']:g} * |reference| "
                               f"of {o['elements']}; max |diff| {o['max_absdiff']:.3g}", **kw))
        out.append(gate("parity", "rel_l2", o["max_rel_l2"], tol["max_rel_l2"], "<=", EXIT_ACCURACY,
                        detail=f"the worst image's ||engine - reference|| / ||reference|| (image {o['worst_image']} "
                               f"of {o['images']})", **kw))
        out.append(gate("parity", "mean_rel_l2", o["mean_rel_l2"], tol["max_mean_rel_l2"], "<=", EXIT_ACCURACY,
                        detail=f"mean over {o['images']} images of ||engine - reference|| / ||reference||", **kw))
        out.append(gate("parity", "prob_js", o["q_prob_js"], tol["max_prob_js"], "<=", EXIT_ACCURACY, unit="bits",
                        detail=f"{100 * o['quantile']:g}th percentile over images of the Jensen-Shannon divergence "
                               "between the softmax of engine and reference", **kw))
        out.append(gate("parity", "mean_prob_js", o["mean_prob_js"], tol["max_mean_prob_js"], "<=", EXIT_ACCURACY,
                        unit="bits", detail=f"mean over {o['images']} images of the same divergence", **kw))
    cs, ag = rep["class_shift"], rep.get("agreement") or {}
    out.append(gate("parity", "class_shift", abs(cs["shift"]), tol["max_class_shift"], "<=", EXIT_ACCURACY,
                    subject=subject, unit="fraction", outcome=cs.get("outcome"), interval=cs.get("interval"),
                    detail=f"predicted class {cs['class']}: {cs['reference']} -> {cs['engine']} of {rep['images']} "
                           f"images ({cs.get('moved_in')} moved in, {cs.get('moved_out')} out; the interval is the "
                           f"shift's, exact on the images that moved; the largest shift of any class "
                           f"{cs['max_abs_shift']:.4g})"))
    out.append(gate("parity", "top1_agreement", rep["top1_agreement"], tol["min_top1_agreement"], ">=",
                    EXIT_ACCURACY, subject=subject, unit="fraction", outcome=ag.get("outcome"),
                    interval=[1.0 - v for v in reversed(ag["interval"])] if ag.get("interval") else None,
                    detail=f"engine and reference agree on the top-1 class of {rep['images']} images "
                           f"({ag.get('count')} disagree; the interval is the agreement's, Clopper-Pearson)"))
    a = rep["accuracy"]
    out.append(gate("parity", "accuracy_loss", a["loss_pt"], tol["max_acc_loss"], "<=", EXIT_ACCURACY,
                    subject=subject, unit="pt", outcome=a["outcome"], interval=a["ci_pt"],
                    detail=f"top-1 reference {rep['torch_top1']:.2f}% - engine {rep['engine_top1']:.2f}%; "
                           f"{100 * a['confidence']:g}% interval [{a['ci_pt'][0]:+.2f}, {a['ci_pt'][1]:+.2f}] pt "
                           f"(McNemar exact: {a['only_a_right']} images only the reference gets right, "
                           f"{a['only_b_right']} only the engine)"))
    if rep.get("outcome", PASS if rep.get("passed") else FAIL) != decide_outcome(out):
        raise InternalError(f"parity report outcome {rep.get('outcome')} but its verdict entries say "
                            f"{decide_outcome(out)}: {rep.get('failures')} {rep.get('undecided')}")
    return out


def parity_info(rep: dict) -> dict:
    """What the parity report measured without deciding on it (an int8 engine against the fp32 engine)."""
    return {"vs_fp32_engine": rep["vs_second"]} if rep.get("vs_second") else {}


def latency_gate(measured_ratio: float, requested_ratio: float, tolerance: float, *, teacher_ms: float | None = None,
                 student_ms: float | None = None, subject: str | None = "student") -> dict:
    """``export.require_budget``: the delivered engine's measured ratio to the teacher against the budget.

    One-sided: the engine may be at most ``tolerance`` (``search.measured_tolerance``, relative) slower
    than the requested fraction of the teacher's latency, both timed in one session on this machine. An
    engine faster than asked is not a latency failure (its accuracy has gates of its own).
    """
    limit = requested_ratio * (1.0 + tolerance)
    ms = f"; student {student_ms:.3f} ms / teacher {teacher_ms:.3f} ms" if teacher_ms and student_ms else ""
    return gate("latency", "budget", measured_ratio, limit, "<=", EXIT_LATENCY, subject=subject,
                unit="ratio to the teacher",
                detail=f"requested {requested_ratio:.1%} of the teacher's latency, +{pct(tolerance)} tolerance "
                       f"(search.measured_tolerance){ms}")


def _outcome(g: dict) -> str:
    return g.get("outcome") or (PASS if g["passed"] else FAIL)


def decide_outcome(gates: Iterable[dict]) -> str:
    """fail when any entry failed, else inconclusive when any could not decide, else pass."""
    outs = {_outcome(g) for g in gates}
    return FAIL if FAIL in outs else INCONCLUSIVE if INCONCLUSIVE in outs else PASS


def decide(gates: Iterable[dict]) -> tuple[bool, int]:
    """(passed, exit code) of a list of entries: the lowest failing code; 6 when none failed but one could
    not decide; 0 when all passed."""
    gates = list(gates)
    failed = [g["exit_code"] for g in gates if _outcome(g) == FAIL]
    if failed:
        return False, min(failed)
    if any(_outcome(g) == INCONCLUSIVE for g in gates):
        return False, EXIT_INCONCLUSIVE
    return True, EXIT_PASS


def failure_lines(gates: Iterable[dict]) -> list[str]:
    """One line per failed entry: what failed, the figure against the threshold, and the detail."""
    out = []
    for g in gates:
        if g["passed"]:
            continue
        who = "".join(f" ({w})" for w in (g.get("subject"),) if w) + (f" output '{g['output']}'" if g.get("output") else "")
        m = "not finite" if g["measured"] is None else f"{g['measured']:.4g}"
        how = "UNDECIDED" if _outcome(g) == INCONCLUSIVE else "FAILED"
        out.append(f"{g['gate']} {g['check']}{who} {how}: {m}, needs {g['op']} {g['threshold']:g}"
                   + (f" ({g['detail']})" if g.get("detail") else ""))
    return out


def make_verdict(gates: list[dict], kind: str, *, error: str | None = None, info: dict | None = None) -> dict:
    """The verdict dict (see the module docstring); a failed one without ``error`` names its failed entries."""
    passed, code = decide(gates)
    if error is not None and passed:  # a gate error with every entry passing: the record is wrong, not the gate
        raise InternalError(f"verdict of kind {kind!r} has an error but no failed gate: {error}")
    if error is None and not passed:
        head = "no gate failed, but these could not decide" if code == EXIT_INCONCLUSIVE else f"{EXIT_CODES[code]} failed"
        error = f"{head}:\n  " + "\n  ".join(failure_lines(gates))
    return {"schema": VERDICT_SCHEMA, "kind": kind,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "passed": passed, "outcome": decide_outcome(gates), "exit_code": code, "exit_meaning": EXIT_CODES[code],
            "error": error, "gates": list(gates), "info": info or {}}


def _path(where: str | os.PathLike) -> Path:
    """A ``*.json`` path as it is; anything else is a directory holding ``verdict.json``."""
    p = Path(where)
    return p if p.suffix == ".json" else RunDir(p).verdict


def write_verdict(where: str | os.PathLike, gates: list[dict], kind: str, *, error: str | None = None,
                  info: dict | None = None) -> dict:
    """Write ``verdict.json`` atomically into a directory (or to a file path); returns the verdict."""
    v = make_verdict(gates, kind, error=error, info=info)
    atomic_write_json(_path(where), v)
    return v


def read_verdict(where: str | os.PathLike) -> dict:
    """Read a verdict (a directory or a file); raises :class:`UserError` for a missing or foreign one."""
    p = _path(where)
    if not p.is_file():
        raise UserError("verdict", f"no verdict at '{p}'", "run `vitrim run` or `vitrim export` on that directory")
    v = read_json(p, "verdict", "verdict", "re-run the stage that wrote it")
    if not isinstance(v, dict) or v.get("schema") != VERDICT_SCHEMA:
        raise UserError("verdict", f"'{p}' has schema {v.get('schema') if isinstance(v, dict) else None!r}, not {VERDICT_SCHEMA}",
                        "re-run the stage with this vitrim version")
    return v


def _key(g: dict) -> tuple:
    return g["gate"], g["check"], g.get("subject"), g.get("output")


def merge_gates(where: str | os.PathLike, gates: list[dict], *, kind: str | None = None, error: str | None = None,
                info: dict | None = None) -> dict:
    """Add entries to the verdict in ``where`` (created when absent) and rewrite it atomically.

    An entry with the same (gate, check, subject, output) replaces the old one, so a rerun of the same
    gate does not pile up entries. ``passed`` and ``exit_code`` are recomputed over every entry; ``kind``
    replaces the old kind when given, ``info`` is merged key by key. A failed verdict's ``error`` is written
    afresh from every failed entry (the old text is not kept). This is the hook the regression gate uses::

        v = merge_gates(run_dir, [gate("regression", "latency", ratio, 1 + max_reg, "<=", EXIT_REGRESSION)])
        raise_for(v)  # RegressionGateError (exit 5) when it failed
    """
    p = _path(where)
    old = read_verdict(p) if p.is_file() else {"kind": kind or "export", "gates": [], "info": {}, "error": None}
    new_keys = {_key(g) for g in gates}
    merged = [g for g in old["gates"] if _key(g) not in new_keys] + list(gates)
    passed, _ = decide(merged)
    err = None if passed else error  # a new failure is described afresh from every failed entry
    return write_verdict(p, merged, kind or old["kind"], error=err, info={**old.get("info", {}), **(info or {})})


def raise_for(verdict: dict, message: str | None = None) -> None:
    """Raise the :class:`GateError` subclass of the verdict's exit code when it failed; nothing when it passed."""
    if verdict["passed"]:
        return
    cls = _ERRORS.get(verdict["exit_code"], GateError)
    raise cls(message or verdict.get("error") or "\n".join(failure_lines(verdict["gates"])), verdict)


def write_run_verdict(where: str | os.PathLike, teacher_parity: dict | None, student_parity: dict | None = None, *,
                      measured_budget: dict | None = None, require_budget: bool = False,
                      error: str | None = None) -> dict:
    """The verdict of a ``vitrim run``: both releases' parity gates (subjects ``teacher`` and ``student``) and,
    with ``require_budget``, the latency gate of the delivered engine; returns it after writing it.

    ``measured_budget`` is the run's closed-loop record (``{"requested", "tolerance", "delivered":
    {"measured_ratio", ...}}``); without ``require_budget`` its figures go to ``info`` only. ``error`` is
    the message of a gate that already failed (the caller re-raises it). The caller raises for a failed
    latency gate with :func:`raise_for`, after this wrote the evidence.
    """
    gates, info = [], {}
    for subject, rep in (("teacher", teacher_parity), ("student", student_parity)):
        if rep is not None:
            gates += parity_gates(rep, subject)
            info.update({f"{subject}_{k}": v for k, v in parity_info(rep).items()})
    if measured_budget is not None and measured_budget.get("delivered"):
        d = measured_budget["delivered"]
        g = latency_gate(d["measured_ratio"], measured_budget["requested"], measured_budget["tolerance"],
                         teacher_ms=d.get("teacher_ms"), student_ms=d.get("student_ms"))
        if require_budget:
            gates.append(g)
        else:
            info["latency_budget"] = {k: g[k] for k in ("measured", "threshold", "op", "unit", "detail")}
            info["latency_budget"].update(within=g["passed"], enforced=False)  # export.require_budget=true enforces it
    elif require_budget:
        raise UserError("run", "export.require_budget is set but the run measured no delivered latency ratio",
                        "use a latency budget (search.budget_fraction or budget_ms) on an ONNX Runtime target, or "
                        "set export.require_budget=false")
    return write_verdict(where, gates, "run", error=error, info=info)
