"""I/O faults are user errors (exit 2) naming the path, the cause and the fix, on real filesystems:
a small tmpfs that fills up and a read-only bind mount (the ``mounts`` fixture; skipped where it cannot mount)."""
from __future__ import annotations

import errno

import pytest
import torch

from vitrim.pipeline.core.errors import IOFault, UserError
from vitrim.pipeline.core.io import (atomic_save, atomic_write_bytes, atomic_write_json, check_writable, io_fault,
                                     make_dir, name_location, undo_on_fault)


def test_read_only_write_names_path_cause_and_fix(tmp_path, mounts):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old.json").write_text("{}")
    ro = mounts.read_only(src)
    name_location(ro, "cache_dir")
    with pytest.raises(IOFault) as e:
        atomic_write_json(ro / "lut.json.partial", {"a": 1})
    assert isinstance(e.value, UserError) and e.value.errno == errno.EROFS
    msg = str(e.value)
    assert f"'{ro / 'lut.json.partial'}'" in msg and "read-only" in msg and "cache_dir" in msg
    assert ".tmp" not in msg  # the target is named, not the temp file beside it
    with pytest.raises(IOFault, match="read-only"):
        make_dir(ro / "sub")
    with pytest.raises(IOFault, match="read-only") as e:
        check_writable(ro, "--out")
    assert "--out" in str(e.value)
    check_writable(tmp_path / "new" / "deeper")  # a directory still to be made, under a writable one
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in src.iterdir()) == ["old.json"]


def test_full_disk_write_says_no_space_and_leaves_nothing(mounts):
    full = mounts.full_disk("full", "64k")
    with pytest.raises(IOFault) as e:
        atomic_write_bytes(full / "big.bin", b"x" * 200_000)
    assert e.value.errno == errno.ENOSPC and "no space left" in str(e.value) and "big.bin" in str(e.value)
    assert list(full.iterdir()) == []


def test_a_writer_that_hides_the_os_error_is_blamed_on_the_disk(mounts):
    """torch.save reports a full disk as 'unexpected pos'; the filesystem, all but full, is what is named."""
    full = mounts.full_disk("full", "64k")
    with pytest.raises(IOFault) as e:
        atomic_save(full / "checkpoint.pt", lambda tmp: torch.save({"w": torch.zeros(100_000)}, str(tmp)))
    assert "no space left" in str(e.value) and "checkpoint.pt" in str(e.value)
    assert list(full.iterdir()) == []


def test_a_writer_error_with_room_on_disk_is_not_blamed_on_it(tmp_path):
    def broken(tmp):
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        atomic_save(tmp_path / "x.bin", broken)


def test_missing_parent_and_a_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(IOFault, match="is a file, not a directory"):
        atomic_write_json(tmp_path / "file" / "x.json", {})
    msg = str(io_fault(tmp_path / "a" / "b.json", errno.ENOENT))
    assert "a parent directory is missing" in msg and "fix: create the parent directory" in msg


def test_undo_on_fault_takes_back_what_the_block_wrote(tmp_path, mounts):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "student.safetensors").write_bytes(b"keep")
    full = mounts.full_disk("full", "64k")
    with pytest.raises(IOFault) as e:
        with undo_on_fault(out, (out / "manifest.json",)):
            (out / "model.onnx").write_bytes(b"half")
            (out / "teacher").mkdir()
            (out / "teacher" / "parity.json").write_text("{}")
            atomic_write_bytes(full / "engine", b"x" * 200_000)
    assert "no space left" in str(e.value) and "model.onnx" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["student.safetensors"]
    fresh = tmp_path / "fresh"
    with pytest.raises(IOFault):
        with undo_on_fault(fresh):
            fresh.mkdir()
            (fresh / "resolved_config.yaml").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device", str(fresh / "model.onnx"))
    assert not fresh.exists()


def test_shared_use_lets_only_the_last_holder_clean_up(tmp_path):
    """Two builds of one table share its partial and parts: the first to finish must leave them to the other."""
    from vitrim.pipeline.core.io import shared_use

    lock = tmp_path / ".lut.json.lock"
    with shared_use(lock) as first:
        with shared_use(lock) as second:
            assert not first()  # done first: the other one still uses the files
            assert second()  # the last one out cleans up
    with shared_use(lock) as only:
        assert only()


def test_undo_on_fault_keeps_what_a_rerun_resumes_from(tmp_path):
    """`vitrim run`'s release stops on a full disk: the release goes, the search and fine-tuned student stay."""
    from vitrim.pipeline.core.rundir import RunDir

    rd = RunDir(tmp_path / "run").mkdir()
    rd.search_dir.mkdir()
    with pytest.raises(IOFault) as e:
        with undo_on_fault(rd.root, rd.release_claims(), keep=rd.resumable()):
            rd.search_dir.plan.write_text("{}")
            rd.student.write_bytes(b"w")
            rd.stages.write_text("{}")
            rd.teacher_dir.mkdir()
            rd.teacher_dir.manifest.write_text("{}")
            rd.onnx.write_bytes(b"g")
            raise OSError(errno.ENOSPC, "No space left on device", str(rd.ort_engine))
    assert "no space left" in str(e.value) and "no release was left" in str(e.value)
    left = sorted(p.relative_to(rd.root).as_posix() for p in rd.root.rglob("*"))
    assert left == ["search", "search/plan.json", "stages.json", "student.safetensors"]


def test_the_cli_turns_a_stray_os_error_into_exit_2(monkeypatch, capsys):
    from vitrim.pipeline import cli

    def boom(args):
        raise OSError(errno.EROFS, "Read-only file system", "/ro/x.json")

    monkeypatch.setattr(cli, "cmd_run", boom)
    assert cli.main(["run", "configs/fmnist_cpu.yaml"]) == 2
    assert "cannot write '/ro/x.json': the filesystem is mounted read-only" in capsys.readouterr().err

    def bug(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "cmd_run", bug)
    with pytest.raises(OSError):  # not an I/O fault of the user's: a bug keeps its traceback
        cli.main(["run", "configs/fmnist_cpu.yaml"])
