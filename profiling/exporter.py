"""Export micro-models and sliced plans in worker processes before they are timed.

A dynamo export is single-threaded Python (0.5-2 s per micro-model, 5-8 s per
DeiT-Small plan), and nothing is timed while a build exports, so two workers
halve the export time of a LUT build or a validation. The workers are plain
``python -m vitrim.profiling.exporter JOBS`` subprocesses, not a
``multiprocessing`` pool: a spawned pool re-runs the caller's ``__main__``
(a user's script without a main guard would recurse) and a forked one inherits
the parent's OpenMP pools. Each file is written atomically, so a killed export
leaves whole files or none, and the runners reuse them (``reuse=True``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from vitrim.pipeline.core.plan import Plan

WORKERS = 2


def export_parallel(jobs: list[tuple], log: Callable[[str], None] = print, workers: int = WORKERS,
                    state: Optional[dict] = None) -> bool:
    """Run export ``jobs`` in ``workers`` subprocesses; True when all of them succeeded.

    A job is ``("item", item, spec, tokens, path)`` (a LUT micro-model or calibration plan,
    :class:`vitrim.profiling.micro.Item`) or ``("plan", plan, path)`` (``plan`` sliced from ``state``).
    A job whose file exists is skipped. On a worker failure the caller exports what is missing itself.
    """
    import torch

    jobs = [j for j in jobs if not Path(j[-1]).is_file()]
    if not jobs:
        return True
    workers = max(1, min(workers, len(jobs), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="vitrim-export-") as tmp:
        state_path = None
        if state is not None and any(j[0] == "plan" for j in jobs):
            state_path = os.path.join(tmp, "state.pt")
            torch.save(state, state_path)
        procs = []
        try:
            for w in range(workers):
                path = os.path.join(tmp, f"jobs{w}.json")
                with open(path, "w") as f:
                    json.dump({"jobs": [_encode(j) for j in jobs[w::workers]], "state": state_path,
                               "parent": os.getpid()}, f)
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                procs.append(subprocess.Popen([sys.executable, "-m", "vitrim.profiling.exporter", path], env=env))
            rcs = [p.wait() for p in procs]  # every worker, even after one failed
        finally:
            for p in procs:  # an error or interrupt here: no worker outlives the export
                if p.poll() is None:
                    p.kill()
                    p.wait()
        ok = all(rc == 0 for rc in rcs)
    if not ok:
        log("[profile] an export worker failed; exporting the rest in this process")
    return ok


def _encode(job: tuple) -> dict:
    """A job as JSON (the workers load no pickles)."""
    if job[0] == "item":
        _, item, spec, tokens, path = job
        d = {"key": item.key, "kind": item.kind, "dims": list(item.dims), "tokens": item.tokens,
             "plan": item.plan.to_dict() if item.plan is not None else None,
             "merge": [list(item.merge[0]), item.merge[1]] if item.merge is not None else None}
        return {"kind": "item", "item": d, "spec": spec, "tokens": tokens, "path": path}
    _, plan, path = job
    return {"kind": "plan", "plan": plan.to_dict(), "path": path}


def _decode_item(d: dict):
    from vitrim.profiling.micro import Item

    return Item(d["key"], d["kind"], tuple(d["dims"]), Plan.from_dict(d["plan"]) if d["plan"] else None, d["tokens"],
                (tuple(d["merge"][0]), d["merge"][1]) if d["merge"] else None)


def _run(jobs_file: str) -> int:
    import warnings

    import torch

    from vitrim.export.engine import export_cached

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    with open(jobs_file) as f:
        spec_ = json.load(f)
    state = torch.load(spec_["state"], weights_only=True) if spec_["state"] else None  # tensors only
    for job in spec_["jobs"]:
        if os.getppid() != spec_["parent"]:  # the build was killed: stop, its rerun exports what is missing
            return 1
        if job["kind"] == "item":
            from vitrim.profiling.micro import make_item

            model, shape = make_item(_decode_item(job["item"]), job["spec"], job["tokens"])
        else:
            from vitrim.pipeline.core.slicing import slice_model

            plan = Plan.from_dict(job["plan"])
            model, shape = slice_model(state, plan), (plan.spec["in_chans"], *plan.spec["img_size"])
        path = job["path"]
        export_cached(model, Path(path), shape, reuse=True)
    return 0


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1]))
