"""``vitrim compare`` and the release workflow's end of ``vitrim run`` (issue 24).

* :func:`stage_compare` - the regression gate of a candidate release against a baseline release
  (:mod:`vitrim.export.compare`): ``compare.json``, the gate entries in ``verdict.json``, exit 5 on a
  regression.
* :func:`finish_release` - what ``vitrim run`` adds to its student's release once the summary is known:
  the model card with the measured speedup, the Triton repository (``export.triton``) and the regression
  gate against ``export.baseline``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from vitrim.pipeline.core.config import ExportConfig, RunConfig
from vitrim.pipeline.core.rundir import RunDir

# ExportConfig keys that decide what happens to a finished release, not the release itself: changing them
# must not rebuild the engine (the export stage's cache key leaves them out)
RELEASE_WORKFLOW_KEYS = ("baseline", "max_latency_regression", "max_acc_regression", "compare_rounds",
                         "compare_repeats", "compare_sessions", "triton", "triton_name", "triton_max_batch")


def export_key(e: ExportConfig) -> dict:
    """The export settings that change the engine or its gate (the export stage's cache key)."""
    return {k: v for k, v in dataclasses.asdict(e).items() if k not in RELEASE_WORKFLOW_KEYS}


def stage_compare(cfg: RunConfig, baseline: str | os.PathLike, candidate: str | os.PathLike,
                  out: Optional[str | os.PathLike] = None, log: Callable[[str], None] = print) -> dict:
    """Gate ``candidate`` against ``baseline`` on ``cfg``'s test split and thresholds (raises exit 5 on a regression)."""
    from vitrim.export.compare import compare_from_config

    return compare_from_config(cfg, baseline, candidate, out=out, log=log)


def finish_release(cfg: RunConfig, rd: RunDir, summary: dict, verdict: dict,
                   log: Callable[[str], None] = print) -> dict:
    """The model card with the run's speedup, ``export.triton``, and the gate against ``export.baseline``.

    Returns the run's verdict with the regression entries merged in; the caller raises for it (so a
    failed accuracy or latency gate keeps its lower exit code).
    """
    from vitrim.export.card import dataset_info, write_model_card
    from vitrim.export.triton import triton_from_config
    from vitrim.export.verdict import read_verdict
    from vitrim.pipeline.core.errors import InconclusiveError, RegressionGateError

    speedup = None
    if summary.get("speedup") is not None:
        speedup = {"value": summary["speedup"], "teacher_ms": summary["teacher"]["measured_ms"],
                   "student_ms": summary["student"]["measured_ms"],
                   "protocol": summary.get("latency_protocol", "teacher and student timed by their releases")}
    log(f"[run] model card {write_model_card(rd.root, dataset=dataset_info(cfg.data), speedup=speedup)}")
    triton_from_config(cfg, rd.root, log=log)
    if not cfg.export.baseline:
        return verdict
    try:
        stage_compare(cfg, cfg.export.baseline, rd.root, log=log)
    except (RegressionGateError, InconclusiveError) as e:
        log(str(e))  # the run raises for its merged verdict at its end (the lowest failing exit code)
    return read_verdict(rd.verdict)
