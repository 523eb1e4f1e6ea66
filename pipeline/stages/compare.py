"""``vitrim compare`` and the release workflow's end of ``vitrim run`` (issue 24).

* :func:`stage_compare` - the regression gate of a candidate release against a baseline release
  (:mod:`vitrim.export.compare`): ``compare.json``, the gate entries in ``verdict.json``, exit 5 on a
  regression.
* :func:`finish_release` - what ``vitrim run`` adds to its student's release once the summary is known:
  the model card with the measured speedup, the regression gate against ``export.baseline``, and then,
  only when every gate passed, the Triton repository (``export.triton``).
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
    """The model card with the run's speedup, the gate against ``export.baseline``, then ``export.triton``.

    The Triton repository is written only when the run's verdict (parity, ``export.require_budget``,
    regression) passed: a failed release is never laid out for serving.

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
    from vitrim.export.manifest import seal_manifest

    seal_manifest(rd.root, log=log)  # the card is part of the release that compare verifies
    if cfg.export.baseline:
        try:
            stage_compare(cfg, cfg.export.baseline, rd.root, log=log)
        except (RegressionGateError, InconclusiveError) as e:
            log(str(e))  # the run raises for its merged verdict at its end (the lowest failing exit code)
        verdict = read_verdict(rd.verdict)
    if verdict["passed"]:  # serving copies only of a release that passed every gate
        triton_from_config(cfg, rd.root, log=log)
    elif cfg.export.triton:
        from vitrim.export.triton import TritonRepo, sanitize_name

        model_dir = TritonRepo(cfg.export.triton).model_dir(sanitize_name(cfg.export.triton_name or cfg.name))
        how = "could not be decided" if verdict.get("outcome") == "inconclusive" else "failed a gate"
        log(f"[triton] not written: the release {how} (exit {verdict['exit_code']}, "
            f"{verdict['exit_meaning']}); export.triton gets only releases that passed every gate"
            + (f" ({model_dir} is an earlier release's, left as it was)" if model_dir.exists() else ""))
    return verdict
