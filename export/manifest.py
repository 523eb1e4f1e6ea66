"""The release manifest: what was shipped, how it was checked, how fast it is.

``manifest.json`` holds the sha256 of every artifact, library versions, the
device signature, the preprocessing the engine expects (input size, resize, crop,
interpolation, mean/std, channels, layout, value range, and where each came from),
accuracy, measured and predicted latency, the parity figures and a config hash. It is
written only after the parity gate passed.

The release directory is relocatable and tamper-evident:

* every artifact path is relative to the directory and inside it; :func:`write_manifest` refuses a
  file outside it (the release step copies what it ships into the directory first), so the
  directory verifies after a copy or a move;
* :func:`verify_manifest` re-hashes every artifact, refuses a path that leaves the directory (absolute,
  ``..``, a symlink pointing out), lists model files in the directory that the manifest does not
  cover (:data:`MODEL_SUFFIXES`), and checks nested releases (``teacher/`` of a run) the same way;
* :func:`sign_manifest` writes a detached Ed25519 signature of ``manifest.json`` (``manifest.json.sig``,
  the raw 64-byte signature, as ``openssl pkeyutl -sign -rawin`` makes it), and ``verify_manifest(...,
  pubkey=...)`` checks it, so a release job can prove who produced the engine. Signing needs the
  optional ``cryptography`` package (``pip install vitrim[sign]``).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

from vitrim.pipeline.core.errors import InternalError, UserError
from vitrim.pipeline.core.io import atomic_write_json, read_json, sha256_file
from vitrim.pipeline.core.rundir import RunDir

MANIFEST_SCHEMA = 1
# files a serving system would load as a model: one in the directory that the manifest does not cover fails
# verification (an engine dropped in beside the verified one)
MODEL_SUFFIXES = (".onnx", ".plan", ".pt2", ".safetensors", ".engine", ".xml", ".bin")  # .xml/.bin: OpenVINO IR
_LIBS = ("vitrim", "torch", "timm", "onnx", "onnxruntime", "openvino", "nncf", "onnxscript", "polygraphy", "numpy",
         "safetensors", "tensorrt")


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def _inside(path: Path, root: Path) -> Optional[str]:
    """``path`` relative to ``root`` (POSIX separators) when it resolves inside it (symlinks followed), else None."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def write_manifest(run_dir: str | os.PathLike, artifacts: dict[str, str | os.PathLike], *, parity: dict,
                   signature: dict, accuracy: dict, latency: dict, config_hash: str, extra: dict | None = None,
                   preprocessing: dict | None = None) -> Path:
    """Hash the artifacts and write ``run_dir/manifest.json`` atomically.

    Every artifact must live inside ``run_dir`` (after symlinks are resolved); it is stored by its
    path relative to ``run_dir``, so the directory can be moved. A previous signature of the
    manifest is removed: it signed other contents. ``preprocessing`` is
    :meth:`~vitrim.pipeline.core.preprocessing.Preprocessing.to_dict` of what the model was
    evaluated with; ``None`` is recorded as such (an ONNX released without a config).

    Raises:
        UserError: an artifact is missing, or lives outside ``run_dir`` (copy it in first).
    """
    if not parity.get("passed"):
        raise InternalError("write_manifest called for a model that failed the parity gate")
    run_dir = Path(run_dir)
    entries = {}
    for name, p in artifacts.items():
        p = Path(p)
        if not p.is_file():
            raise UserError("manifest", f"artifact '{name}' at '{p}' is missing", "re-run the stage that produces it")
        rel = _inside(p, run_dir)
        if rel is None:
            raise UserError("manifest", f"artifact '{name}' at '{p}' is outside the release directory '{run_dir}'",
                            "copy it into the directory first (vitrim.pipeline.core.io.copy_into), so the release "
                            "can be moved and verified on its own")
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
    rd = RunDir(run_dir)
    rd.manifest_signature.unlink(missing_ok=True)
    atomic_write_json(rd.manifest, manifest)
    return rd.manifest


def _path_problem(rel, base: Path) -> Optional[str]:
    """Why a manifest path is not a file inside ``base``, or None when it is one."""
    if not isinstance(rel, str) or not rel.strip():
        return f"path {rel!r} is not a relative file path"
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return f"path '{rel}' is absolute (a release lists paths relative to its directory)"
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        return f"path '{rel}' leaves the release directory ('..')"
    if _inside(base / rel, base) is None:
        return f"path '{rel}' resolves outside the release directory (a symlink to '{(base / rel).resolve()}')"
    return None


def _scan(base: Path) -> tuple[list[str], list[Path], list[str]]:
    """(model files, nested release directories, symlinks leaving ``base``), walking without following links.

    A sub-directory with a ``manifest.json`` of its own (``teacher/`` in a run) is a nested release:
    its files are its own manifest's business, checked by the caller.
    """
    models, nested, escaping = [], [], []
    for d, dirs, files in os.walk(base, followlinks=False):
        here = Path(d)
        for name in list(dirs):
            sub = here / name
            if sub.is_symlink():
                dirs.remove(name)
                if _inside(sub, base) is None:
                    escaping.append(sub.relative_to(base).as_posix())
            elif RunDir(sub).manifest.is_file():
                dirs.remove(name)
                nested.append(sub)
        for name in files:
            f = here / name
            rel = f.relative_to(base).as_posix()
            if f.is_symlink() and _inside(f, base) is None:
                escaping.append(rel)
            elif name.endswith(MODEL_SUFFIXES):
                models.append(rel)
    return sorted(models), sorted(nested), sorted(escaping)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise UserError("verify-manifest", f"no manifest at '{path}'", "run `vitrim export` (it writes one after parity passes)")
    m = read_json(path, "verify-manifest", "manifest", "the manifest is corrupt; re-export")
    if not isinstance(m, dict) or m.get("schema") != MANIFEST_SCHEMA:
        raise UserError("verify-manifest", f"'{path}' has schema {m.get('schema') if isinstance(m, dict) else None!r}",
                        "re-export with this vitrim version")
    if not isinstance(m.get("artifacts"), dict):
        raise UserError("verify-manifest", f"'{path}' lists no artifacts", "the manifest is corrupt; re-export")
    return m


def _problems(base: Path, m: dict, prefix: str = "") -> list[str]:
    """Every way the directory differs from its manifest (nested releases included)."""
    problems, covered = [], set()
    for name, e in m["artifacts"].items():
        rel = e.get("path") if isinstance(e, dict) else None
        why = _path_problem(rel, base)
        if why:
            problems.append(f"{prefix}{name}: {why}")
            continue
        p = base / rel
        covered.add(_inside(p, base))
        if not p.is_file():
            problems.append(f"{prefix}{name}: '{prefix}{rel}' is missing")
        elif sha256_file(p) != e.get("sha256"):
            problems.append(f"{prefix}{name}: '{prefix}{rel}' has changed (sha256 mismatch)")
    models, nested, escaping = _scan(base)
    problems += [f"{prefix}{rel}: a symlink leaving the release directory" for rel in escaping]
    problems += [f"{prefix}{rel}: a model file the manifest does not cover" for rel in models if rel not in covered]
    for sub in nested:
        sub_prefix = f"{prefix}{sub.name}/"
        try:
            problems += _problems(sub, _load(RunDir(sub).manifest), sub_prefix)
        except UserError as e:
            problems.append(f"{sub_prefix}{RunDir(sub).manifest.name}: {e.what}")
    return problems


def verify_manifest(run_dir: str | os.PathLike, pubkey: str | os.PathLike | None = None) -> dict:
    """Check a release directory against its manifest; returns the manifest.

    Re-hashes every artifact, refuses paths that leave the directory, lists model files the manifest
    does not cover, checks nested releases (sub-directories with a manifest of their own), and, with
    ``pubkey`` (an Ed25519 public key, PEM), checks the detached signature ``manifest.json.sig``.

    Raises:
        UserError: listing every problem found (the CLI exits 2).
    """
    run_dir = Path(run_dir)
    path = RunDir(run_dir).manifest if run_dir.is_dir() else run_dir
    m = _load(path)
    base = path.parent
    if pubkey is not None:
        _check_signature(base, pubkey)
    problems = _problems(base, m)
    if problems:
        raise UserError("verify-manifest", "manifest check failed:\n  " + "\n  ".join(problems),
                        "restore the original artifacts, remove files the release does not ship, or re-run the export")
    return m


# --- signatures (optional: the `sign` extra) ---------------------------------------------------------------

def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UserError("sign", "signing needs the 'cryptography' package", "pip install 'vitrim[sign]'") from None
    return serialization, ed25519


def _read_key(path: str | os.PathLike, private: bool):
    serialization, ed25519 = _crypto()
    what = "private" if private else "public"
    p = Path(path)
    if not p.is_file():
        raise UserError("sign", f"{what} key '{p}' not found", "make one: openssl genpkey -algorithm ed25519 -out "
                        "key.pem; openssl pkey -in key.pem -pubout -out key.pub.pem")
    data = p.read_bytes()
    try:
        if private:
            pw = os.environ.get("VITRIM_KEY_PASSWORD")
            key = serialization.load_pem_private_key(data, password=pw.encode() if pw else None)
        else:
            key = serialization.load_pem_public_key(data)
    except TypeError as e:  # encrypted without a password, or a password for a plain key
        raise UserError("sign", f"cannot open the {what} key '{p}' ({e})",
                        "set VITRIM_KEY_PASSWORD to the key's passphrase") from None
    except ValueError as e:
        raise UserError("sign", f"'{p}' is not a PEM {what} key ({e})",
                        f"pass an Ed25519 {what} key in PEM ({'openssl genpkey -algorithm ed25519' if private else 'openssl pkey -pubout'})") from None
    cls = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, cls):
        raise UserError("sign", f"'{p}' is a {type(key).__name__}, not an Ed25519 {what} key",
                        "make an Ed25519 key: openssl genpkey -algorithm ed25519 -out key.pem")
    return key


def key_fingerprint(public_key) -> str:
    """``sha256:<hex>`` of the raw 32-byte Ed25519 public key (to name the signer in logs)."""
    import hashlib

    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sign_manifest(run_dir: str | os.PathLike, key: str | os.PathLike) -> Path:
    """Verify the directory, then write the detached Ed25519 signature of its ``manifest.json``.

    The signature covers the manifest's bytes, and the manifest covers every artifact's sha256, so
    it attests to the whole release. Returns the signature's path (``manifest.json.sig``).
    """
    from vitrim.pipeline.core.io import atomic_write_bytes

    rd = RunDir(run_dir)
    private = _read_key(key, private=True)  # a bad key fails before anything is read
    verify_manifest(rd.root)  # never sign a directory that does not match its manifest
    atomic_write_bytes(rd.manifest_signature, private.sign(rd.manifest.read_bytes()))
    return rd.manifest_signature


def _check_signature(base: Path, pubkey: str | os.PathLike) -> str:
    from cryptography.exceptions import InvalidSignature

    rd = RunDir(base)
    public = _read_key(pubkey, private=False)
    if not rd.manifest_signature.is_file():
        raise UserError("verify-manifest", f"no signature at '{rd.manifest_signature}'",
                        f"sign the release: vitrim sign {base} --key KEY.pem")
    try:
        public.verify(rd.manifest_signature.read_bytes(), rd.manifest.read_bytes())
    except InvalidSignature:
        raise UserError("verify-manifest", f"the signature '{rd.manifest_signature}' does not match "
                        f"'{rd.manifest}' under the key '{pubkey}' ({key_fingerprint(public)})",
                        "the manifest changed after signing, or it was signed with another key: re-export and "
                        "sign again with the right key, or pass the signer's public key") from None
    return key_fingerprint(public)
