"""Every write of a run, a cache and a release goes through here.

Atomic file writes (a temp file in the same directory, then ``os.replace``): a crash or a
SIGTERM leaves either the old file or the new one, never half of it.

I/O faults get the same care as bad input: an ``OSError`` met while writing (a read-only
filesystem, no space left, permission denied, a missing parent) becomes an :class:`IOFault`,
a :class:`~vitrim.pipeline.core.errors.UserError` (exit 2) naming the path, the cause and the
fix. A writer that is not Python's own (torch.save, ONNX Runtime's optimized-model writer)
reports a full disk as a format error ("unexpected pos", "Protobuf serialization failed");
:func:`atomic_path` looks at the filesystem before it blames the content. :func:`name_location`
tells the fix which config key or flag chose a directory (``cache_dir``, ``--out``), and
:func:`undo_on_fault` takes back what a release wrote when it stops on an I/O fault, so nothing
half-written looks like a release.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from vitrim.pipeline.core.errors import IOFault, UserError, VitrimError

# the causes an OSError names, and their fixes (the key that chose the location is added by io_fault)
_CAUSES = {
    errno.EROFS: ("the filesystem is mounted read-only", "remount it read-write"),
    errno.ENOSPC: ("no space left on the device", "free space on that filesystem"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within the quota"),
    errno.EACCES: ("permission denied", "make it writable for this user (chmod/chown)"),
    errno.EPERM: ("operation not permitted", "make it writable for this user (chmod/chown)"),
    errno.ENOENT: ("a parent directory is missing", "create the parent directory, or fix the path"),
    errno.ENOTDIR: ("a parent of it is a file, not a directory", "fix the path"),
    errno.EISDIR: ("it is a directory", "fix the path"),
    errno.EEXIST: ("a file is in the way of a directory", "move that file away, or fix the path"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
    errno.EIO: ("an input/output error from the device", "check the disk (dmesg)"),
}
FAULT_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM})  # never a bug
LOW_SPACE_BYTES = 1 << 20  # a failed write on a filesystem with less than this free is blamed on the disk
_LOCATIONS: dict[Path, str] = {}


def name_location(path: str | os.PathLike, key: str) -> None:
    """Record that ``key`` (a config key or a flag: ``cache_dir``, ``--out``) chose directory ``path``,
    so an I/O fault under it names the key to change."""
    _LOCATIONS[Path(os.path.abspath(path))] = key


def _key_for(path: Path) -> Optional[str]:
    p = Path(os.path.abspath(path))
    best = None
    for root, key in _LOCATIONS.items():
        if (p == root or root in p.parents) and (best is None or len(root.parts) > len(best[0].parts)):
            best = (root, key)
    return best[1] if best else None


def cause(code: int) -> str:
    """The cause an errno names, in words (read-only filesystem, no space left, ...)."""
    return _CAUSES.get(code, (os.strerror(code) if code else "an I/O error", ""))[0]


def free_bytes(path: str | os.PathLike) -> Optional[int]:
    """Bytes free to this user on the filesystem holding ``path`` (its nearest existing ancestor)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mb(n: Optional[int]) -> str:
    return "unknown" if n is None else (f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes")


def io_fault(path: str | os.PathLike, err: OSError | int, action: str = "write", stage: str = "io",
             detail: str = "") -> IOFault:
    """The :class:`IOFault` for ``err`` (an OSError or an errno) met while ``action``-ing ``path``."""
    code = err if isinstance(err, int) else err.errno
    path = Path(path)
    cause, fix = _CAUSES.get(code, (os.strerror(code) if code else str(err), "check that location"))
    if code in (errno.ENOSPC, errno.EDQUOT):
        cause += f" ({_mb(free_bytes(path))} free)"
    key = _key_for(path)
    where = f"point {key} at a writable location with room" if key else "write somewhere else"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"{where}, or {fix}"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        fix = f"{fix}, or {where}"
    elif key:
        fix = f"{fix} ({key} chose it)"
    other = None if isinstance(err, int) else getattr(err, "filename", None)
    if (other and Path(other) != path and not _is_tmp_of(Path(other), path)  # the OS blamed another file
            and code not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):  # (a copy names its source for these)
        if code == errno.ENOENT:
            cause = f"'{other}' does not exist"
        elif code == errno.EEXIST:
            cause, fix = f"'{other}' is a file, not a directory", "move that file away, or fix the path"
        detail = f"{detail}; at '{other}'" if detail else f"at '{other}'"
    what = f"cannot {action} '{path}': {cause}" + (f" ({detail})" if detail else "")
    return IOFault(stage, what, fix, path=str(path), errno_=code)


def _is_tmp_of(other: Path, path: Path) -> bool:
    return other.parent == path.parent and other.name.startswith(f".{path.name}.")


def disk_full_fault(path: str | os.PathLike, exc: BaseException, stage: str = "io") -> Optional[IOFault]:
    """The :class:`IOFault` for a writer's own exception ``exc`` when the filesystem at ``path`` is what
    failed it (its text names an OS error, or the disk is all but full), else None."""
    text = str(exc)
    for code, marks in ((errno.ENOSPC, ("No space left", "os error 28", "Errno 28")),
                        (errno.EDQUOT, ("quota exceeded", "os error 122")),
                        (errno.EROFS, ("Read-only file system", "os error 30", "Errno 30"))):
        if any(m.lower() in text.lower() for m in marks):
            return io_fault(path, code, stage=stage, detail=_short(exc))
    free = free_bytes(path)
    if free is not None and free < LOW_SPACE_BYTES:
        return io_fault(path, errno.ENOSPC, stage=stage, detail=f"the writer said: {_short(exc)}")
    return None


def _short(exc: BaseException) -> str:
    t = exc.what if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"  # its fix blamed the content
    t = t.strip().replace("\n", " ")
    return t if len(t) <= 200 else t[:197] + "..."


@contextlib.contextmanager
def writing(path: str | os.PathLike, action: str = "write", stage: str = "io") -> Iterator[Path]:
    """Run a block that writes ``path`` (a file or a directory); an ``OSError`` in it becomes an :class:`IOFault`."""
    path = Path(path)
    try:
        yield path
    except OSError as e:
        raise io_fault(path, e, action, stage) from None


def make_dir(path: str | os.PathLike, stage: str = "io") -> Path:
    """``mkdir -p path``; an I/O fault exits 2 naming the directory and the cause."""
    path = Path(path)
    with writing(path, "create the directory", stage):
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(path: str | os.PathLike, key: Optional[str] = None, stage: str = "io") -> Path:
    """Refuse (exit 2) before any work when directory ``path`` cannot be written.

    A directory that does not exist yet is judged by its nearest existing ancestor (nothing is created).
    The probe creates and removes an empty file, which a read-only mount, a permission or a missing
    ancestor refuses (a full disk is only found when the bytes are written).
    """
    path = Path(path)
    if key:
        name_location(path, key)
    probe_dir = path
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise io_fault(path, errno.ENOTDIR, "create the directory" if probe_dir != path else "write into", stage)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vitrim-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise io_fault(path, e, "write into" if probe_dir == path else "create the directory", stage) from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, stage: str = "io") -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` on success.

    An ``OSError`` anywhere (the parent, the temp file, the writer, the rename) becomes an
    :class:`IOFault` naming ``path``; another exception from the writer while the filesystem is
    all but full becomes one too (no space left), with the writer's own message kept as detail.
    """
    path = Path(path)
    tmp = None
    try:
        with writing(path, stage=stage):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(tmp)
        try:
            yield tmp
            with writing(path, stage=stage):
                if tmp.exists():  # mkstemp makes 0600 files; artifacts get the usual umask-based mode
                    umask = os.umask(0)
                    os.umask(umask)
                    os.chmod(tmp, 0o666 & ~umask)
                os.replace(tmp, path)
        except OSError as e:
            raise io_fault(path, e, stage=stage) from None
        except Exception as e:  # a writer that is not Python's own: was it the disk?
            if isinstance(e, VitrimError) and type(e) is not UserError:  # a fault, a gate, a signal: as raised
                raise
            fault = disk_full_fault(path, e, stage)
            if fault is not None:
                raise fault from None
            raise
    finally:
        if tmp is not None and tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_json(path: str | os.PathLike, stage: str, what: str, fix: str) -> Any:
    """Read a JSON file or raise a UserError naming it (missing / not JSON)."""
    from vitrim.pipeline.core.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(stage, f"{what} '{p}' not found", fix)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(stage, f"'{p}' is not valid JSON ({e})", fix) from None


def copy_into(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` atomically (nothing to do when they are the same file)."""
    import shutil

    if Path(src).resolve() == Path(dst).resolve():
        return dst
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def remove(path: str | os.PathLike, stage: str = "io") -> None:
    """``unlink(missing_ok=True)``; an I/O fault exits 2 naming the file."""
    with writing(path, "remove", stage):
        Path(path).unlink(missing_ok=True)


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath, n)
            with contextlib.suppress(OSError):
                st = p.lstat()
                files[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return files


@contextlib.contextmanager
def undo_on_fault(root: str | os.PathLike, claims: tuple[str | os.PathLike, ...] = (),
                  keep: tuple[str | os.PathLike, ...] = (), what: str = "release") -> Iterator[Path]:
    """Take back what the block wrote under ``root`` when it stops on an I/O fault.

    Every file the block created or changed under ``root`` is removed, then the directories it created
    (``root`` too, when the block made it and it is left empty); when a file that was there before was
    changed or removed, the ``claims`` (a manifest, a verdict: what makes a directory look like a
    release) go too, since they describe contents that are gone. Files under ``keep`` (a run's resumable
    work: its stage record, search, fine-tuned weights) stay. The :class:`IOFault` (an ``OSError``
    becomes one) is raised again with what was removed, or what could not be and must be deleted by hand.
    """
    root = Path(root)
    existed = root.exists()
    before = _snapshot(root) if existed else {}
    dirs_before = {Path(d) for d, _, _ in os.walk(root)} if existed else set()
    try:
        yield root
    except (IOFault, OSError) as e:
        fault = e if isinstance(e, IOFault) else io_fault(getattr(e, "filename", None) or root, e)
        after = _snapshot(root) if root.exists() else {}
        kept = [Path(k).resolve() for k in keep]

        def stays(rel: str) -> bool:
            p = (root / rel).resolve()
            return any(p == k or k in p.parents for k in kept)

        doomed = [rel for rel, st in after.items() if before.get(rel) != st and not stays(rel)]
        touched = bool(doomed and any(rel in before for rel in doomed)) or any(rel not in after for rel in before)
        paths = [root / rel for rel in doomed]
        if touched:
            paths += [Path(c) for c in claims if Path(c).exists() and Path(c) not in paths]
        removed, stuck = [], []
        for p in paths:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                stuck.append(p)
        for d in sorted((Path(d) for d, _, _ in os.walk(root)), key=lambda d: len(d.parts), reverse=True):
            if d not in dirs_before and (d != root or not existed):
                with contextlib.suppress(OSError):
                    d.rmdir()
        names = ", ".join(p.relative_to(root).as_posix() for p in removed[:8]) + (", ..." if len(removed) > 8 else "")
        if getattr(fault, "undone", False):  # an inner guard took back its part and said so
            note = f"; also removed {names}" if removed else ""
        elif stuck:
            note = (f"; the {what} in '{root}' is INCOMPLETE: {len(stuck)} file(s) it wrote could not be removed "
                    f"({', '.join(str(p) for p in stuck[:4])}): delete them before using the directory")
        elif removed:
            note = f"; no {what} was left in '{root}' (removed the {len(removed)} file(s) it had written: {names})"
        elif fault.path and (Path(fault.path) == root or root in Path(fault.path).parents):
            note = f"; nothing was written to '{root}'"
        else:
            note = ""
        out = IOFault(fault.stage, fault.what + note, fault.fix, fault.path, fault.errno)
        out.undone = not stuck
        raise out from None


@contextlib.contextmanager
def shared_use(lock: str | os.PathLike) -> Iterator[Callable[[], bool]]:
    """Hold a shared ``flock`` on file ``lock`` while using files that other processes may use too (two
    builds of one table into one cache); yields ``alone()``, true when no other holder is left, so the
    last one out cleans up and nobody removes files under another's feet. Call ``alone()`` once, when done
    with the shared files: a refused upgrade may drop this holder's own shared lock (``flock`` converts
    non-atomically)."""
    import fcntl

    with writing(lock):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)

        def alone() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        yield alone
    finally:
        os.close(fd)
