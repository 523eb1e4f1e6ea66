"""The release manifest: what was shipped, how it was checked, how fast it is.

``manifest.json`` holds the sha256 of every artifact, library versions, the
device signature, the preprocessing the engine expects (input size, resize, crop,
interpolation, mean/std, channels, layout, value range, and where each came from),
accuracy, measured and predicted latency, the parity figures and a config hash. It is written only after the parity gate passed;
:func:`verify_manifest` re-checks the hashes.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from vitrim.pipeline.core.errors import InternalError, UserError
from vitrim.pipeline.core.io import atomic_write_json, sha256_file
from vitrim.pipeline.core.rundir import RunDir

MANIFEST_SCHEMA = 1
_LIBS = ("vitrim", "torch", "timm", "onnx", "onnxruntime", "onnxscript", "polygraphy", "numpy", "safetensors", "tensorrt")


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(run_dir: str | os.PathLike, artifacts: dict[str, str | os.PathLike], *, parity: dict,
                   signature: dict, accuracy: dict, latency: dict, config_hash: str, extra: dict | None = None,
                   preprocessing: dict | None = None) -> Path:
    """Hash the artifacts and write ``run_dir/manifest.json`` atomically.

    Artifacts are stored relative to ``run_dir`` where they live inside it. ``preprocessing`` is
    :meth:`~vitrim.pipeline.core.preprocessing.Preprocessing.to_dict` of what the model was
    evaluated with; ``None`` is recorded as such (an ONNX released without a config).
    """
    if not parity.get("passed"):
        raise InternalError("write_manifest called for a model that failed the parity gate")
    run_dir = Path(run_dir)
    entries = {}
    for name, p in artifacts.items():
        p = Path(p)
        if not p.is_file():
            raise UserError("manifest", f"artifact '{name}' at '{p}' is missing", "re-run the stage that produces it")
        try:
            rel = str(p.resolve().relative_to(run_dir.resolve()))
        except ValueError:
            rel = str(p.resolve())
        entries[name] = {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "artifacts": entries,
        "libraries": library_versions(),
        "device_signature": signature,
        "preprocessing": preprocessing,
        "accuracy": accuracy,
        "latency": latency,
        "parity": parity,
        "config_hash": config_hash,
        **(extra or {}),
    }
    path = RunDir(run_dir).manifest
    atomic_write_json(path, manifest)
    return path


def verify_manifest(run_dir: str | os.PathLike) -> dict:
    """Re-hash every artifact. Raises :class:`UserError` listing each mismatch."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).manifest if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError("verify-manifest", f"no manifest at '{path}'", "run `vitrim export` (it writes one after parity passes)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError("verify-manifest", f"'{path}' is not valid JSON ({e})", "the manifest is corrupt; re-export") from None
    if m.get("schema") != MANIFEST_SCHEMA:
        raise UserError("verify-manifest", f"'{path}' has schema {m.get('schema')!r}", "re-export with this vitrim version")
    base = path.parent
    problems = []
    for name, e in m["artifacts"].items():
        p = Path(e["path"]) if os.path.isabs(e["path"]) else base / e["path"]
        if not p.is_file():
            problems.append(f"{name}: '{p}' is missing")
        elif sha256_file(p) != e["sha256"]:
            problems.append(f"{name}: '{p}' has changed (sha256 mismatch)")
    if problems:
        raise UserError("verify-manifest", "manifest check failed:\n  " + "\n  ".join(problems),
                        "restore the original artifacts or re-run the export")
    return m
