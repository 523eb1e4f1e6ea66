"""The regression gate (`vitrim compare`): real releases re-timed side by side and re-evaluated on real images."""
import json
import shutil

import pytest
import torch

from vitrim.export.compare import compare_releases
from vitrim.export.release import release
from vitrim.export.target import Target
from vitrim.pipeline.core.data import make_loader
from vitrim.pipeline.core.errors import EXIT_REGRESSION, RegressionGateError, UserError
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.rundir import RunDir
from vitrim.pipeline.core.slicing import full_size_compact, slice_model

QUIET = dict(log=lambda m: None)


def _release(out, model, splits, batch=8):
    release(out, Target(batch=batch, threads=1), make_loader(splits.test, batch), model=model, warmup=1, repeats=5,
            preprocessing=splits.preprocessing, **QUIET)
    return out


@pytest.fixture(scope="module")
def releases(int8_teacher, tmp_path_factory):
    """A trained tiny teacher, a smaller (faster) student of it, the teacher with its classes permuted, and
    the teacher released for another batch: real releases on 384 Fashion-MNIST test images."""
    _, teacher, splits = int8_teacher
    d = tmp_path_factory.mktemp("compare")
    full, _ = full_size_compact(teacher)
    plan = Plan.full(full.plan.spec)
    plan.blocks[1].keep = False  # one of two blocks, half the MLP of the other: clearly less work
    plan.blocks[0].mlp = plan.blocks[0].mlp[: len(plan.blocks[0].mlp) // 2]
    student = slice_model(teacher, plan)
    permuted = slice_model(teacher, Plan.full(full.plan.spec))
    with torch.no_grad():  # same graph, same cost; every class's logit moved to the next class: wrong answers
        w, b = permuted.head.weight, permuted.head.bias
        w.copy_(w.roll(1, 0)), b.copy_(b.roll(1, 0))
    return {"splits": splits, "teacher": _release(d / "teacher", full, splits),
            "student": _release(d / "student", student, splits),
            "permuted": _release(d / "permuted", permuted, splits),
            "batch4": _release(d / "batch4", full, splits, batch=4), "dir": d}


def _compare(r, base, cand, out, **kw):
    kw = {"max_latency_regression": 0.25, "rounds": 8, "repeats": 48, "warmup": 2, "out": out,
          "data_preprocessing": r["splits"].preprocessing.to_dict(), **QUIET, **kw}
    return compare_releases(r[base] if isinstance(base, str) else base, r[cand] if isinstance(cand, str) else cand,
                            make_loader(r["splits"].test, 8), **kw)


def test_a_slower_candidate_fails_with_exit_5_and_a_copy_passes(releases, tmp_path):
    r = releases
    # the teacher (both blocks, full MLP) as the candidate against its student: a planted latency regression
    with pytest.raises(RegressionGateError) as e:
        _compare(r, "student", "teacher", tmp_path / "slow")
    assert e.value.exit_code == EXIT_REGRESSION == 5
    c = json.loads(RunDir(tmp_path / "slow").compare.read_text())
    gates = {g["check"]: g for g in c["gates"]}
    assert not c["passed"] and c["exit_code"] == 5 and not gates["latency"]["passed"]
    assert gates["latency"]["measured"] == c["latency"]["ratio"] > 1.25  # the gate figure is the paired ratio
    assert c["latency"]["candidate"]["median_ms"] > c["latency"]["baseline"]["median_ms"]
    assert c["accuracy"]["images"] == 384 and len(c["latency"]["sessions"]) >= 1
    v = json.loads(RunDir(tmp_path / "slow").verdict.read_text())  # the gate entries, merged into verdict.json
    assert not v["passed"] and v["exit_code"] == 5
    assert {(g["gate"], g["check"]) for g in v["gates"]} == {("regression", "latency"), ("regression", "accuracy")}

    # the same release, copied elsewhere (relocated): same engine, same answers, a ratio near 1
    copy = shutil.copytree(r["student"], tmp_path / "copy")
    c = _compare(r, "student", copy, None)
    assert c["passed"] and c["exit_code"] == 0 and c["outcome"] == "pass"
    assert c["accuracy"]["delta_pt"] == 0.0 and c["accuracy"]["agreement"] == 1.0  # one engine, deterministic
    assert c["accuracy"]["test"]["ci_pt"] == [0.0, 0.0] and c["accuracy"]["test"]["outcome"] == "pass"
    assert abs(c["latency"]["ratio"] - 1) < 0.25 and abs(c["latency"]["aa_ratio"] - 1) < 0.25
    assert RunDir(copy).compare.is_file() and json.loads(RunDir(copy).verdict.read_text())["passed"]


def test_a_less_accurate_candidate_fails_on_accuracy(releases, tmp_path):
    r = releases
    with pytest.raises(RegressionGateError, match="accuracy"):
        _compare(r, "teacher", "permuted", tmp_path)
    c = json.loads(RunDir(tmp_path).compare.read_text())
    g = {g["check"]: g for g in c["gates"]}
    a = c["accuracy"]
    # same graph, same cost: the latency gate holds; the accuracy gate fails by far more than one image
    assert g["latency"]["passed"] and not g["accuracy"]["passed"]
    assert a["baseline_top1"] > 30 and a["delta_pt"] < -20 and g["accuracy"]["measured"] == pytest.approx(-a["delta_pt"])
    assert g["accuracy"]["outcome"] == "fail" and g["accuracy"]["interval"][0] > 0.3  # lost with confidence
    assert a["only_baseline_right"] > a["only_candidate_right"]
    # the figures are the engines' own on these images: the teacher's top-1 as its release's parity gate saw it
    m = json.loads(RunDir(r["teacher"]).manifest.read_text())
    assert a["baseline_top1"] == pytest.approx(m["accuracy"]["engine_top1"], abs=1e-9)


def test_compare_refuses_what_it_cannot_compare(releases, tmp_path):
    r = releases
    # two targets: the device signatures differ in the batch, and the refusal names it with both values
    with pytest.raises(UserError, match=r"differs in: batch\).*batch: 8 vs 4"):
        _compare(r, "teacher", "batch4", tmp_path)
    # test images preprocessed otherwise than the releases expect
    other = {**r["splits"].preprocessing.to_dict(), "mean": [0.5], "std": [0.5]}
    with pytest.raises(UserError, match="differs in: mean, std"):
        _compare(r, "teacher", "student", tmp_path, data_preprocessing=other)
    # a tampered engine is not compared
    bad = shutil.copytree(r["student"], tmp_path / "tampered")
    engine = RunDir(bad).ort_engine
    engine.write_bytes(engine.read_bytes() + b"\0")
    with pytest.raises(UserError, match="has changed"):
        _compare(r, "teacher", bad, tmp_path)
    assert not RunDir(tmp_path).compare.exists()  # a refused comparison leaves no figures


def test_a_noisy_machine_makes_the_latency_inconclusive_with_exit_6(releases, tmp_path, monkeypatch):
    """A planted noisy machine: the real paired timing, with its A/A control moved by 10% (more than the 3%
    threshold). The same release passed on its own figures; with that control it cannot decide: exit 6."""
    import vitrim.export.compare as cmp
    from vitrim.pipeline.core.errors import InconclusiveError

    real = cmp.time_pair

    def noisy(*a, **kw):
        lat = real(*a, **kw)
        for s in lat["sessions"]:
            s["aa_ratio"] = 1.10
        return lat

    monkeypatch.setattr(cmp, "time_pair", noisy)
    copy = shutil.copytree(releases["student"], tmp_path / "copy")
    with pytest.raises(InconclusiveError) as e:
        _compare(releases, "student", copy, None, max_latency_regression=0.03)
    assert e.value.exit_code == 6
    c = json.loads(RunDir(copy).compare.read_text())
    g = {g["check"]: g for g in c["gates"]}
    assert c["outcome"] == "inconclusive" and c["exit_code"] == 6 and not c["passed"] and c["noisy"]
    assert g["latency"]["outcome"] == "inconclusive" and g["accuracy"]["outcome"] == "pass"
    v = json.loads(RunDir(copy).verdict.read_text())
    assert v["exit_code"] == 6 and v["outcome"] == "inconclusive"
    from vitrim.export.manifest import verify_manifest

    verify_manifest(copy)  # compare.json and the merged verdict are covered by the resealed manifest


def test_compare_decides_accuracy_on_export_parity_images(releases, tmp_path):
    """`max_images` (export.parity_images): 40 images of a class-permuted candidate already show the loss."""
    with pytest.raises(RegressionGateError):
        _compare(releases, "teacher", "permuted", tmp_path, max_images=40)
    c = json.loads(RunDir(tmp_path).compare.read_text())
    assert c["accuracy"]["images"] == 40 and c["accuracy"]["test"]["images"] == 40
