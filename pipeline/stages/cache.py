"""The cache (``cache_dir``): what a command will write there, decided before any work.

A cache that cannot be written (a CI runner's read-only mount of a shared cache) is still read:
the teacher and the latency table it holds are used as they are. What a command would have to add
(a teacher to train, a table to measure) is refused before any training or measuring, naming
``cache_dir`` and the cause, or, with ``cache_fallback: temp``, built in a temporary directory that
is deleted at exit (the cached files are linked into it, so they are still read).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from vitrim.pipeline.core.config import RunConfig
from vitrim.pipeline.core.errors import IOFault
from vitrim.pipeline.core.io import cause, check_writable, io_fault, name_location


def cache_writes(cfg: RunConfig, teacher: Optional[str] = "load", lut: bool = False, spec: Optional[dict] = None,
                 rebuild_lut: bool = False) -> list[tuple[str, Path, str]]:
    """``(what, path, key)`` of each cached input this command would write: the teacher when it will be
    trained (``teacher="train"``: ``vitrim train-teacher``; ``"force"``: with --force; ``"load"``: trained only
    when nothing else provides it), the LUT (``lut``) when none for this target and teacher is cached."""
    from vitrim.pipeline.stages.teacher import teacher_path

    out = []
    tkey = "teacher.cache" if cfg.teacher.cache else "cache_dir"
    tp = teacher_path(cfg)
    if teacher == "force":
        out.append(("the retrained teacher (--force)", tp, tkey))
    elif teacher == "train" and not tp.is_file():
        out.append(("the teacher", tp, tkey))
    elif (teacher == "load" and not tp.is_file() and not (cfg.model.checkpoint or cfg.model.pretrained)
          and cfg.data.name == "fmnist"):  # else load_teacher says what is missing
        out.append(("the teacher", tp, tkey))
    if lut:
        from vitrim.export.target import Target
        from vitrim.pipeline.stages.profile import _stale_reason, lut_path
        from vitrim.pipeline.core.plan import Plan

        if spec is None:
            from vitrim.pipeline.core.models import create_model, describe

            spec = describe(create_model(cfg.model, load_checkpoint=False, pretrained=False), cfg.model.arch,
                            cfg.model.kwargs)
        target = Target.from_config(cfg.target)
        lp = lut_path(cfg, spec, target)
        lkey = "profile.lut" if cfg.profile.lut else "cache_dir"
        if rebuild_lut or not lp.is_file():
            out.append(("the latency table for this target", lp, lkey))
        elif not cfg.profile.lut:
            stale = _stale_reason(lp, cfg, spec, target, target.signature(Plan.full(spec).num_tokens))
            if stale is not None:
                out.append((f"a current latency table for this target (the cached one is stale: {stale})", lp, lkey))
    return out


def prepare_cache(cfg: RunConfig, teacher: Optional[str] = "load", lut: bool = False, spec: Optional[dict] = None,
                  rebuild_lut: bool = False, log: Callable[[str], None] = print) -> RunConfig:
    """Check, before any work, that what this command adds to the cache can be written.

    Returns ``cfg``, whose ``cache_dir`` is a temporary directory when ``cache_fallback`` is ``temp`` and
    ``cache_dir`` cannot be written.

    Raises:
        IOFault: the cache (or ``teacher.cache`` / ``profile.lut``) cannot be written and lacks something
            this command needs (exit 2), naming the key to set.
    """
    name_location(cfg.cache_dir, "cache_dir")
    writes = cache_writes(cfg, teacher, lut, spec, rebuild_lut)
    blocked: list[tuple[str, Path, str, IOFault]] = []
    for what, path, key in writes:
        try:
            check_writable(path.parent, key, stage="cache")
        except IOFault as e:
            blocked.append((what, path, key, e))
    if not blocked:
        return cfg
    what = " and ".join(w for w, *_ in blocked)
    names = ", ".join(p.name for _, p, *_ in blocked)
    own = [b for b in blocked if b[2] != "cache_dir"]  # a file the user named: its key is the fix
    if own:
        _, path, key, e = own[0]
        raise IOFault("cache", f"{key}='{path}' cannot be written ({cause(e.errno)}), and {what} must be built "
                      f"there ({names})", f"set {key} to a writable location (or an existing file), or make "
                      f"'{path.parent}' writable", str(path), e.errno)
    e = blocked[0][3]
    d = Path(cfg.cache_dir)
    if cfg.cache_fallback != "temp":
        raise IOFault("cache", f"cache_dir '{d}' cannot be written ({cause(e.errno)}), and this command must add "
                      f"{what} to it ({names}); nothing was trained or measured",
                      "set cache_dir to a writable directory (--set cache_dir=DIR; copy what it holds there to "
                      "reuse it), or --set cache_fallback=temp to build what is missing in a temporary directory "
                      "(deleted at exit; what the cache holds is still read)", str(d), e.errno)
    try:
        tmp = Path(tempfile.mkdtemp(prefix="vitrim-cache-"))
    except OSError as err:
        raise io_fault(tempfile.gettempdir(), err, "create a temporary cache in", "cache") from None
    atexit.register(shutil.rmtree, tmp, True)
    linked = 0
    if d.is_dir():
        for entry in d.iterdir():  # what the cache holds is still read (a half-built table's parts are not)
            if not entry.name.startswith("."):
                os.symlink(entry.resolve(), tmp / entry.name)
                linked += 1
    log(f"[cache] cache_dir '{d}' cannot be written ({cause(e.errno)}): building {what} in the temporary "
        f"directory {tmp} (cache_fallback=temp; deleted at exit), with the {linked} file(s) '{d}' holds linked in")
    cfg.cache_dir = str(tmp)
    name_location(tmp, "cache_dir")
    return cfg


def check_out_dir(path, key: str = "--out") -> None:
    """Refuse (exit 2) before any work when the output directory cannot be written."""
    check_writable(path, key)


