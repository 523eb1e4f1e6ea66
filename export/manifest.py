"""The release manifest: what was shipped, how it was checked, how fast it is.

``manifest.json`` holds the sha256 of every artifact, library versions, the
device signature, the preprocessing the engine expects (input size, resize, crop,
interpolation, mean/std, channels, layout, value range, and where each came from),
accuracy, measured and predicted latency, the parity figures and a config hash. It is
written only after the parity gate passed.

The release directory is relocatable and tamper-evident as a whole:

* every artifact path is relative to the directory and inside it; :func:`write_manifest` refuses a
  file outside it (the release step copies what it ships into the directory first), so the
  directory verifies after a copy or a move;
* ``files`` holds the sha256 of **every file under the directory**, whatever its name: nested
  releases (``teacher/`` of a run) with their own manifests, ``verdict.json``, ``compare.json``,
  ``MODEL_CARD.md``, a Triton repository inside it. Stages that add a file to a release afterwards
  call :func:`seal_manifest`, which rewrites ``files`` (and drops a signature, which signed other
  contents). Only ``manifest.json`` and its signature are not listed;
* :func:`verify_manifest` re-hashes every file, refuses a path that leaves the directory (absolute,
  ``..``, a symlink pointing out), fails on any file the manifest does not list, naming it, and
  checks nested releases against their own manifests too;
* :func:`sign_manifest` writes a detached Ed25519 signature of ``manifest.json`` (``manifest.json.sig``,
  the raw 64-byte signature, as ``openssl pkeyutl -sign -rawin`` makes it), and ``verify_manifest(...,
  pubkey=...)`` checks it over the very bytes it then parses, so a release job can prove who produced
  every file of the release. Signing needs the optional ``cryptography`` package
  (``pip install -e '.[sign]'`` in a source checkout).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

from vitrim.pipeline.core.errors import InternalError, UserError, install_hint
from vitrim.pipeline.core.io import atomic_write_json, sha256_file
from vitrim.pipeline.core.rundir import RunDir

MANIFEST_SCHEMA = 2
_LIBS = ("vitrim", "torch", "timm", "onnx", "onnxscript", "numpy", "safetensors")  # the engines' own: their backends


def library_versions() -> dict:
    """The versions a verdict was measured with: vitrim's own libraries and every registered engine's."""
    from vitrim.export.backends import BACKENDS

    out = {"python": platform.python_version()}
    engines = [lib for b in BACKENDS.values() for lib in b.libraries]
    for lib in dict.fromkeys([*_LIBS, *engines]):
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
    manifest["files"] = _hash_tree(run_dir)
    atomic_write_json(rd.manifest, manifest)
    return rd.manifest


def _own_files(base: Path) -> set[str]:
    rd = RunDir(base)
    return {rd.manifest.name, rd.manifest_signature.name}


def _walk(base: Path) -> tuple[list[str], list[str]]:
    """(files under ``base`` relative to it, symlinks leaving it), walking without following links.

    The top-level ``manifest.json`` and its signature are left out: they cannot list themselves.
    """
    files, escaping = [], []
    own = _own_files(base)
    for d, dirs, names in os.walk(base, followlinks=False):
        here = Path(d)
        for name in list(dirs):
            sub = here / name
            if sub.is_symlink():
                dirs.remove(name)
                (escaping if _inside(sub, base) is None else files).append(sub.relative_to(base).as_posix())
        for name in names:
            f = here / name
            rel = f.relative_to(base).as_posix()
            if here == base and name in own:
                continue
            (escaping if f.is_symlink() and _inside(f, base) is None else files).append(rel)
    return sorted(files), sorted(escaping)


def _hash_tree(base: Path) -> dict:
    files, escaping = _walk(Path(base))
    if escaping:
        raise UserError("manifest", f"'{base}' holds symlinks leaving the directory: {', '.join(escaping)}",
                        "copy what they point to into the release directory, or remove them")
    out = {}
    for rel in files:
        p = Path(base) / rel
        if p.is_dir():  # a symlink to a directory inside the release: its files are listed where they live
            continue
        out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def seal_manifest(run_dir: str | os.PathLike, log=print) -> Optional[Path]:
    """Re-hash every file under ``run_dir`` into its manifest's ``files`` (after a stage added some).

    The named ``artifacts`` and every figure stay as they were. When nothing changed the manifest is left
    alone, and so is a signature; when files changed, a signature signed the old manifest: it is removed,
    and ``log`` says so (sign again). Returns the manifest's path, or None where the directory has no
    manifest (a release that failed its gate has none, and gets none here).
    """
    rd = RunDir(run_dir)
    if not rd.manifest.is_file():
        return None
    m = _load(rd.manifest)
    files = _hash_tree(rd.root)
    if files == m.get("files"):
        return rd.manifest
    m["files"] = files
    if rd.manifest_signature.is_file():
        rd.manifest_signature.unlink()
        log(f"[manifest] {rd.root} changed after it was signed: its signature was removed "
            f"(sign it again: vitrim sign {rd.root} --key KEY)")
    atomic_write_json(rd.manifest, m)
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


def _parse(data: bytes, path: Path) -> dict:
    import json

    try:
        m = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError("verify-manifest", f"'{path}' is not valid JSON ({e})", "the manifest is corrupt; re-export") from None
    if not isinstance(m, dict) or m.get("schema") != MANIFEST_SCHEMA:
        raise UserError("verify-manifest", f"'{path}' has schema {m.get('schema') if isinstance(m, dict) else None!r}, "
                        f"not {MANIFEST_SCHEMA}", "re-export with this vitrim version")
    if not isinstance(m.get("artifacts"), dict) or not isinstance(m.get("files"), dict):
        raise UserError("verify-manifest", f"'{path}' lists no artifacts or files", "the manifest is corrupt; re-export")
    return m


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UserError("verify-manifest", f"no manifest at '{path}'", "run `vitrim export` (it writes one after parity passes)")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError("verify-manifest", f"cannot read '{path}' ({e.strerror})", "check the path and its permissions") from None


def _load(path: Path) -> dict:
    return _parse(_read_bytes(path), path)


def _problems(base: Path, m: dict, prefix: str = "", digests: Optional[dict] = None) -> list[str]:
    """Every way the directory differs from its manifest (nested releases included, each file hashed once)."""
    problems = []
    digests = {} if digests is None else digests

    def digest(p: Path) -> str:  # an artifact is listed in ``files`` too, a nested release's files in both
        key = p.resolve()
        if key not in digests:
            digests[key] = sha256_file(p)
        return digests[key]

    for name, e in m["artifacts"].items():
        rel = e.get("path") if isinstance(e, dict) else None
        why = _path_problem(rel, base)
        if why:
            problems.append(f"{prefix}{name}: {why}")
            continue
        p = base / rel
        if not p.is_file():
            problems.append(f"{prefix}{name}: '{prefix}{rel}' is missing")
        elif digest(p) != e.get("sha256"):
            problems.append(f"{prefix}{name}: '{prefix}{rel}' has changed (sha256 mismatch)")
    listed = m["files"]
    for rel, e in listed.items():
        why = _path_problem(rel, base)
        if why:
            problems.append(f"{prefix}{rel}: {why}")
            continue
        p = base / rel
        if not p.is_file():
            problems.append(f"{prefix}{rel}: missing")
        elif not isinstance(e, dict) or digest(p) != e.get("sha256"):
            problems.append(f"{prefix}{rel}: has changed (sha256 mismatch)")
    files, escaping = _walk(base)
    problems += [f"{prefix}{rel}: a symlink leaving the release directory" for rel in escaping]
    problems += [f"{prefix}{rel}: a file the manifest does not list" for rel in files
                 if rel not in listed and not (base / rel).is_dir()]
    nested = sorted({Path(rel).parent for rel in files if Path(rel).name == RunDir(base).manifest.name
                     and Path(rel).parent != Path(".")})
    for sub in nested:  # a nested release must also match its own manifest
        sub_prefix = f"{prefix}{sub.as_posix()}/"
        try:
            problems += _problems(base / sub, _load(RunDir(base / sub).manifest), sub_prefix, digests)
        except UserError as e:
            problems.append(f"{sub_prefix}{RunDir(base / sub).manifest.name}: {e.what}")
    return problems


def verify_manifest(run_dir: str | os.PathLike, pubkey: str | os.PathLike | None = None) -> dict:
    """Check a release directory against its manifest; returns the manifest.

    Re-hashes every listed file, refuses paths that leave the directory, fails on any file under it
    that the manifest does not list, checks nested releases (sub-directories with a manifest of their
    own) against theirs, and, with ``pubkey`` (an Ed25519 public key, PEM), checks the detached
    signature ``<manifest>.sig`` over the very bytes that are then parsed and checked.

    Raises:
        UserError: listing every problem found (the CLI exits 2).
    """
    run_dir = Path(run_dir)
    path = RunDir(run_dir).manifest if run_dir.is_dir() else run_dir
    if path.name != RunDir(path.parent).manifest.name:
        raise UserError("verify-manifest", f"'{path}' is not a release manifest ({RunDir(path.parent).manifest.name})",
                        f"pass the release directory, or its {RunDir(path.parent).manifest.name}")
    data = _read_bytes(path)
    if pubkey is not None:
        _check_signature(path, data, pubkey)
    m = _parse(data, path)
    problems = _problems(path.parent, m)
    if problems:
        raise UserError("verify-manifest", "manifest check failed:\n  " + "\n  ".join(problems),
                        "restore the original files, remove files the release does not ship, or re-run the export")
    return m


# --- signatures (optional: the `sign` extra) ---------------------------------------------------------------

def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UserError("sign", "signing needs the 'cryptography' package", install_hint("sign")) from None
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

    The signature covers the manifest's bytes, and the manifest covers the sha256 of every file under
    the directory, so it attests to the whole release. Returns the signature's path (``manifest.json.sig``).
    """
    from vitrim.pipeline.core.io import atomic_write_bytes

    rd = RunDir(run_dir)
    private = _read_key(key, private=True)  # a bad key fails before anything is read
    data = _read_bytes(rd.manifest)
    verify_manifest(rd.root)  # never sign a directory that does not match its manifest
    if _read_bytes(rd.manifest) != data:
        raise UserError("sign", f"'{rd.manifest}' changed while it was verified", "sign again once nothing writes to it")
    atomic_write_bytes(rd.manifest_signature, private.sign(data))
    return rd.manifest_signature


def _check_signature(path: Path, data: bytes, pubkey: str | os.PathLike) -> str:
    """Check ``<path>.sig`` over ``data`` (the manifest's bytes as read once by the caller)."""
    from cryptography.exceptions import InvalidSignature

    sig_path = path.with_name(path.name + ".sig")
    public = _read_key(pubkey, private=False)
    if not sig_path.is_file():
        raise UserError("verify-manifest", f"no signature at '{sig_path}'",
                        f"sign the release: vitrim sign {path.parent} --key KEY.pem")
    try:
        public.verify(sig_path.read_bytes(), data)
    except InvalidSignature:
        raise UserError("verify-manifest", f"the signature '{sig_path}' does not match "
                        f"'{path}' under the key '{pubkey}' ({key_fingerprint(public)})",
                        "the manifest changed after signing, or it was signed with another key: re-export and "
                        "sign again with the right key, or pass the signer's public key") from None
    return key_fingerprint(public)
