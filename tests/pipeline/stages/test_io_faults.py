"""The issue-37 cases, end to end through the ``vitrim`` command on real filesystems: a read-only cache with and
without a cached table, a full disk during export, the table build and the fine-tune checkpoint, and an output
directory that exists but cannot be written. Each exits 2 naming the path and the cause, with nothing half-written."""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import TINY_KW, TINY_PCFG, random_init
from vitrim.pipeline.cli import main

KW = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_KW.items()) + "}"


def _sets(fmnist_dir, cache, **more) -> list[str]:
    sets = [f"cache_dir={cache}", f"data.root={fmnist_dir}", "data.train_limit=256", "data.val_limit=64",
            "data.test_limit=64", "data.val_size=1000", "data.batch_size=32", "model.arch=vit_tiny_patch16_224",
            f"model.kwargs={KW}", "teacher.epochs=1", "target.batch=4", "target.threads=1",
            "export.parity_images=64", "profile.warmup=2", "profile.repeats=6",
            *[f"profile.{k}={v}" for k, v in TINY_PCFG.items() if k not in ("warmup", "repeats")]]
    sets += [f"{k}={v}" for k, v in more.items()]
    return [a for s in sets for a in ("--set", s)]


def _cfg(sets):
    from vitrim.pipeline.core.config import load_config

    return load_config("configs/fmnist_cpu.yaml", [sets[i + 1] for i in range(0, len(sets), 2)])


@pytest.fixture
def cached_teacher(tmp_path, fmnist_dir):
    """A cache holding the config's teacher (random weights, saved where ``vitrim`` looks for it)."""
    from vitrim.pipeline.core.models import create_model, save_weights
    from vitrim.pipeline.stages.teacher import teacher_path

    cache = tmp_path / "cache"
    cfg = _cfg(_sets(fmnist_dir, cache))
    save_weights(random_init(create_model(cfg.model, load_checkpoint=False, pretrained=False)), teacher_path(cfg))
    return cache


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_read_only_cache_without_table_is_refused_before_any_work(cached_teacher, tmp_path, fmnist_dir, mounts, capsys):
    ro = mounts.read_only(cached_teacher)
    before = sorted(p.name for p in cached_teacher.iterdir())
    assert main(["profile", "build", "configs/fmnist_cpu.yaml", *_sets(fmnist_dir, ro)]) == 2
    out, err = capsys.readouterr()
    print(err)
    assert f"cache_dir '{ro}' cannot be written (the filesystem is mounted read-only)" in err
    assert "the latency table for this target" in err and "--set cache_dir=DIR" in err and "cache_fallback=temp" in err
    assert "[profile] measuring" not in out
    assert sorted(p.name for p in cached_teacher.iterdir()) == before
    assert main(["search", "configs/fmnist_cpu.yaml", *_sets(fmnist_dir, ro), "--out", str(tmp_path / "o")]) == 2
    assert "cannot be written" in _err(capsys) and not (tmp_path / "o").exists()


def test_read_only_cache_builds_what_is_missing_in_a_temp_dir_when_allowed(tiny_lut, tmp_path, fmnist_dir, mounts,
                                                                          capsys):
    """cache_fallback=temp: the table the read-only cache holds is read; the teacher it lacks is trained in a
    temporary directory, not refused."""
    from vitrim.export.target import Target
    from vitrim.pipeline.stages.profile import lut_path

    cache = tmp_path / "cache"
    cache.mkdir()
    cfg = _cfg(_sets(fmnist_dir, cache))
    shutil.copyfile(tiny_lut[1], lut_path(cfg, tiny_lut[0].spec, Target.from_config(cfg.target)))
    ro = mounts.read_only(cache)
    assert main(["profile", "build", "configs/fmnist_cpu.yaml", *_sets(fmnist_dir, ro)]) == 2
    assert "must add the teacher to it" in _err(capsys)
    assert main(["profile", "build", "configs/fmnist_cpu.yaml", *_sets(fmnist_dir, ro, cache_fallback="temp")]) == 0
    out = capsys.readouterr().out
    assert f"[cache] cache_dir '{ro}' cannot be written (the filesystem is mounted read-only): building the teacher" in out
    assert "[teacher] training" in out and "[profile] reusing LUT" in out and "[profile] measuring" not in out
    assert sorted(p.name for p in cache.iterdir()) == [lut_path(cfg, tiny_lut[0].spec, Target.from_config(cfg.target)).name]


def test_read_only_cache_with_table_is_read(cached_teacher, tiny_lut, fmnist_dir, mounts, capsys):
    """Teacher and table cached: the read-only cache serves both, nothing is written."""
    from vitrim.export.target import Target
    from vitrim.pipeline.stages.profile import lut_path

    cfg = _cfg(_sets(fmnist_dir, cached_teacher))
    shutil.copyfile(tiny_lut[1], lut_path(cfg, tiny_lut[0].spec, Target.from_config(cfg.target)))
    ro = mounts.read_only(cached_teacher)
    before = sorted(p.name for p in cached_teacher.iterdir())
    assert main(["profile", "build", "configs/fmnist_cpu.yaml", *_sets(fmnist_dir, ro)]) == 0
    out = capsys.readouterr().out
    assert "[profile] reusing LUT" in out and "[profile] measuring" not in out
    assert sorted(p.name for p in cached_teacher.iterdir()) == before


def test_full_disk_during_export_blames_the_disk_and_leaves_no_release(cached_teacher, fmnist_dir, mounts, capsys):
    """model.onnx fits, ONNX Runtime's optimized engine does not (ORT says INVALID_PROTOBUF: the disk is named)."""
    out = mounts.full_disk("rel", "300k")
    rc = main(["export", "configs/fmnist_cpu.yaml", "--teacher", "--out", str(out), *_sets(fmnist_dir, cached_teacher)])
    err = _err(capsys)
    print(err)
    assert rc == 2
    assert "no space left on the device" in err and str(out) in err
    assert "may be corrupt" not in err
    assert "no release was left" in err
    assert list(out.iterdir()) == []  # no model.onnx, no resolved_config.yaml, no manifest, no verdict


def test_full_disk_during_the_table_build(cached_teacher, tmp_path, fmnist_dir, mounts, capsys):
    cache = mounts.full_disk("cache", "40k")
    from vitrim.pipeline.stages.teacher import teacher_path

    teacher = teacher_path(_cfg(_sets(fmnist_dir, cached_teacher)))
    rc = main(["profile", "build", "configs/fmnist_cpu.yaml", *_sets(fmnist_dir, cache, **{"teacher.cache": teacher})])
    err = _err(capsys)
    print(err)
    assert rc == 2 and "no space left on the device" in err and str(cache) in err


def test_full_disk_during_the_finetune_checkpoint(cached_teacher, tmp_path, fmnist_dir, mounts, capsys):
    from vitrim.pipeline.core.models import load_weights, create_model
    from vitrim.pipeline.core.slicing import full_size_compact, save_compact
    from vitrim.pipeline.stages.teacher import teacher_path

    cfg = _cfg(_sets(fmnist_dir, cached_teacher))
    teacher = create_model(cfg.model, load_checkpoint=False, pretrained=False)
    load_weights(teacher, teacher_path(cfg), stage="teacher")
    student, plan = full_size_compact(teacher)
    save_compact(student, plan, tmp_path / "student")
    out = mounts.full_disk("ft", "200k")
    rc = main(["finetune", "configs/fmnist_cpu.yaml", "--student", str(tmp_path / "student"), "--out", str(out),
               *_sets(fmnist_dir, cached_teacher, **{"finetune.epochs": 1})])
    err = _err(capsys)
    print(err)
    assert rc == 2 and "no space left on the device" in err and "checkpoint.pt" in err


def test_output_directory_that_cannot_be_written_is_refused_before_any_work(cached_teacher, tmp_path, fmnist_dir,
                                                                           mounts, capsys):
    src = tmp_path / "out"
    src.mkdir()
    ro = mounts.read_only(src)
    for cmd in (["export", "configs/fmnist_cpu.yaml", "--teacher", "--out", str(ro)],
                ["run", "configs/fmnist_cpu.yaml", "--set", f"out_dir={ro}"]):
        assert main([*cmd, *_sets(fmnist_dir, cached_teacher)]) == 2
        out, err = capsys.readouterr()
        print(err)
        assert f"cannot write into '{ro}': the filesystem is mounted read-only" in err
        assert ("point --out at" in err) if cmd[0] == "export" else ("point out_dir at" in err)
        assert "[export]" not in out and "[teacher]" not in out
