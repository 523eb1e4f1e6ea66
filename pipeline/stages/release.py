"""``vitrim export``: release a student, the teacher or a given ONNX into a directory (export, engine, parity
gate, latency, manifest; :func:`vitrim.export.release.release_from_config` does the work)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from vitrim.pipeline.core.config import RunConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.rundir import RunDir


def stage_release(cfg: RunConfig, out_dir: str | os.PathLike, student: Optional[str] = None, teacher: bool = False,
                  onnx: Optional[str] = None, build_lut: bool = False, use_lut: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Release ``student`` (a student directory), the config's teacher, or the ONNX file ``onnx`` (with the
    config's model as the parity reference) into ``out_dir``.

    A student's release carries its weights and plan, and the matching LUT with the predicted latency when
    one is found (or built, with ``build_lut``); a LUT that cannot price the plan leaves the release without a
    prediction, and says why. When the config's teacher is the reference, it is first checked against
    ``model.expected_top1``. An I/O fault (exit 2) takes back what the release wrote into ``out_dir``.
    """
    from vitrim.pipeline.core.io import undo_on_fault

    if onnx and not Path(onnx).is_file():
        raise UserError("export", f"ONNX file '{onnx}' not found", "pass the path of an existing .onnx file")
    rd = RunDir(out_dir)
    with undo_on_fault(rd.root, rd.release_claims()):  # an I/O fault: nothing left that looks like a release
        return _stage_release(cfg, rd, student, teacher, onnx, build_lut, use_lut, log)


def _stage_release(cfg: RunConfig, rd: RunDir, student: Optional[str], teacher: bool, onnx: Optional[str],
                   build_lut: bool, use_lut: bool, log: Callable[[str], None]) -> dict:
    from vitrim.export.release import release_from_config
    from vitrim.export.target import Target
    from vitrim.pipeline.core.io import copy_into
    from vitrim.pipeline.core.slicing import load_compact
    from vitrim.pipeline.stages.profile import find_lut
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.stages.teacher import expect_teacher, load_teacher

    plan = predicted = note = None
    if student:
        model = load_compact(student)
        plan, name = model.plan, f"student {student}"
        if use_lut and build_lut:  # a read-only cache lacking the table: refused before any measuring
            from vitrim.pipeline.stages.cache import prepare_cache

            prepare_cache(cfg, teacher=None, lut=True, spec=plan.spec, log=log)
    elif teacher or onnx:
        # the config's model is the parity reference (and the exported model without --onnx)
        model, _ = load_teacher(cfg, train_if_missing=False)
        name = f"{'ONNX ' + onnx if onnx else 'teacher'} ({cfg.model.arch})"
    else:
        src = RunDir("DIR")
        raise UserError("export", "nothing to export",
                        f"pass --student DIR ({src.plan.name} + {src.student.name}), --teacher, or --onnx FILE")
    Target.from_config(cfg.target).check_available()  # fail fast, before any data is read
    splits = build_splits(cfg.data, model_cfg=cfg.model)  # image-folder transforms come from the teacher's config
    log(splits.preprocessing.line())
    if plan is None:  # the config's teacher is the reference: check it against model.expected_top1 first
        expect_teacher(cfg, model, splits, log=log)
    rd.mkdir()
    if plan is not None:
        src = RunDir(student)
        for a, b in ((src.student, rd.student), (src.plan, rd.plan)):
            copy_into(a, b)
        if use_lut:
            lut = find_lut(cfg, plan.spec, build=build_lut, log=log)
            if lut is not None:
                try:
                    predicted = lut.predict(plan)
                except UserError as e:  # the prediction is optional here: a LUT that cannot price this plan (a
                    # merged student, a LUT without a token axis) leaves the release without one, and says why
                    note = {"latency_prediction": {"available": False, "lut": str(lut.path), "reason": e.what,
                                                   "fix": e.fix}}
                    log(f"[export] predicted latency unavailable: {e.what} (LUT {lut.path}); fix: {e.fix}")
                else:
                    copy_into(lut.path, rd.lut)
    return release_from_config(cfg, model, rd.root, splits.test, plan=plan, predicted_ms=predicted,
                               manifest_extra=note, onnx_path=Path(onnx) if onnx else None, name=name,
                               calib_set=splits.val, preprocessing=splits.preprocessing)
