"""verdict.json (issue 24): every gate's figure, threshold, pass/fail and exit code, on a pass and on each failing
gate, written before the process fails; real releases of a tiny ViT on Fashion-MNIST, real ORT engines and timings."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.export.test_manifest import real_release  # noqa: F401 - the module-scoped real tiny release
from tests.export.test_parity import append_to_output
from vitrim.export.verdict import (VERDICT_SCHEMA, gate, latency_gate, merge_gates, raise_for, read_verdict,
                                   write_run_verdict)
from vitrim.pipeline.cli import main
from vitrim.pipeline.core.errors import (EXIT_ACCURACY, EXIT_INCONCLUSIVE, EXIT_LATENCY, EXIT_REGRESSION,
                                         AccuracyGateError, InconclusiveError, LatencyGateError, RegressionGateError)
from vitrim.pipeline.core.rundir import RunDir

PARITY_CHECKS = {"non_finite", "elementwise", "rel_l2", "mean_rel_l2", "prob_js", "mean_prob_js", "class_shift",
                 "top1_agreement", "accuracy_loss"}


def _strict(path) -> dict:
    """Read JSON the way a strict reader does: NaN/Infinity are not JSON."""
    def no_constants(c):
        raise ValueError(f"non-JSON constant {c} in {path}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def _export(real_release, onnx_path, out, capsys) -> tuple[int, str]:
    rc = main(["export", str(real_release / "c.yaml"), "--onnx", str(onnx_path), "--out", str(out)])
    return rc, capsys.readouterr().err


def test_a_passing_release_writes_a_verdict_with_every_check(real_release):
    rd = RunDir(real_release / "rel")
    v, rep = _strict(rd.verdict), json.loads(rd.parity.read_text())
    assert v["schema"] == VERDICT_SCHEMA and v["kind"] == "export" and v["info"]["target"] == "ort-cpu/fp32"
    assert v["passed"] is True and v["exit_code"] == 0 and v["exit_meaning"] == "pass" and v["error"] is None
    by = {g["check"]: g for g in v["gates"]}
    assert set(by) == PARITY_CHECKS and len(v["gates"]) == len(PARITY_CHECKS)
    out, tol = rep["outputs"]["logits"], rep["tolerances"]  # each figure is parity.json's, each threshold its own
    assert (by["rel_l2"]["measured"], by["rel_l2"]["threshold"]) == (out["max_rel_l2"], tol["max_rel_l2"])
    assert (by["elementwise"]["measured"], by["elementwise"]["threshold"]) == (out["mismatched"], 0)
    assert (by["top1_agreement"]["measured"], by["top1_agreement"]["threshold"], by["top1_agreement"]["op"]) == \
        (rep["top1_agreement"], tol["min_top1_agreement"], ">=")
    acc = by["accuracy_loss"]
    assert (acc["measured"], acc["threshold"], acc["interval"]) == (rep["accuracy"]["loss_pt"], tol["max_acc_loss"],
                                                                    rep["accuracy"]["ci_pt"])
    assert (by["mean_rel_l2"]["measured"], by["prob_js"]["measured"]) == (out["mean_rel_l2"], out["q_prob_js"])
    assert all(g["passed"] and g["exit_code"] == 0 and g["outcome"] == "pass" for g in v["gates"])
    assert v["outcome"] == "pass"
    assert {g["output"] for g in v["gates"] if g["check"] in ("non_finite", "elementwise", "rel_l2")} == {"logits"}


def test_a_broken_engine_exits_3_and_leaves_a_failed_verdict(real_release, tmp_path, capsys):
    """Graph surgery negates the logits; the directory held a passing release before (its verdict must go)."""
    out = shutil.copytree(real_release / "rel", tmp_path / "rel")
    bad = append_to_output(out / "model.onnx", tmp_path / "bad.onnx", "Neg")
    rc, err = _export(real_release, bad, out, capsys)
    assert rc == EXIT_ACCURACY, err
    rd = RunDir(out)
    v = _strict(rd.verdict)
    assert v["passed"] is False and v["exit_code"] == 3 and v["exit_meaning"] == "accuracy/parity gate"
    assert "parity gate FAILED" in v["error"] and not rd.manifest.exists()
    by = {g["check"]: g for g in v["gates"]}
    for check in ("elementwise", "rel_l2", "mean_rel_l2", "top1_agreement"):
        g = by[check]
        assert not g["passed"] and g["exit_code"] == 3, g
    assert by["rel_l2"]["measured"] == pytest.approx(2.0, rel=1e-3)  # ||-r - r|| / ||r||
    assert by["top1_agreement"]["measured"] < 0.5 and by["non_finite"]["passed"]
    assert by["rel_l2"]["measured"] == json.loads(rd.parity.read_text())["outputs"]["logits"]["max_rel_l2"]


def _nan_output(src, dst):
    """Real graph surgery: the output plus sqrt(-1), i.e. NaN everywhere."""
    m = onnx.load(str(src))
    name = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [f"{o}_raw" if o == name else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one"))
    m.graph.node.extend([helper.make_node("Sqrt", ["minus_one"], ["nan"]),
                         helper.make_node("Add", [f"{name}_raw", "nan"], [name])])
    onnx.save(m, str(dst))
    return dst


def test_a_nan_engine_fails_the_non_finite_check_and_the_verdict_stays_strict_json(real_release, tmp_path, capsys):
    bad = _nan_output(real_release / "rel" / "model.onnx", tmp_path / "nan.onnx")
    rc, err = _export(real_release, bad, tmp_path / "rel", capsys)
    assert rc == 3, err
    v = _strict(RunDir(tmp_path / "rel").verdict)
    by = {g["check"]: g for g in v["gates"]}
    assert not by["non_finite"]["passed"] and by["non_finite"]["measured"] == 96 * 10  # every logit of 96 images
    assert by["rel_l2"]["measured"] is None and not by["rel_l2"]["passed"]  # no finite figure: fails, written null


def test_an_undecided_gate_makes_an_inconclusive_verdict_with_exit_6(real_release, tmp_path):
    """No failure, one undecided entry: outcome inconclusive, exit 6, InconclusiveError; a failure outranks it."""
    rd = RunDir(shutil.copytree(real_release / "rel", tmp_path / "rel"))
    undecided = gate("regression", "accuracy", 0.2, 0.3, "<=", EXIT_REGRESSION, outcome="inconclusive",
                     interval=[-0.4, 0.8])
    assert undecided["exit_code"] == EXIT_INCONCLUSIVE and not undecided["passed"]
    v = merge_gates(rd.root, [undecided])
    assert v["outcome"] == "inconclusive" and v["exit_code"] == 6 and v["exit_meaning"] == "inconclusive"
    assert "could not decide" in v["error"] and "UNDECIDED" in v["error"]
    with pytest.raises(InconclusiveError) as e:
        raise_for(v)
    assert e.value.exit_code == 6
    v = merge_gates(rd.root, [gate("regression", "latency", 1.2, 1.03, "<=", EXIT_REGRESSION)])
    assert v["outcome"] == "fail" and v["exit_code"] == 5


def test_the_latency_gate_on_real_timings_exits_4_only_when_required(real_release, tmp_path):
    """The delivered ratio is measured (the same engine timed twice, round-robin: ~1.0 on any machine); a budget
    of half the teacher fails it by far, one of 1.5x passes by far."""
    from vitrim.export.backends.ort_cpu import OrtCpuRunner
    from vitrim.export.runners import interleaved, time_interleaved

    rd = RunDir(real_release / "rel")
    with interleaved([OrtCpuRunner(rd.onnx, 1), OrtCpuRunner(rd.onnx, 1)]) as rs:
        t, s = time_interleaved(rs, 16, repeats=24, rounds=6, warmup=2)
    ratio = s.median_ms / t.median_ms
    assert latency_gate(ratio, 1.5, 0.03)["passed"]
    g = latency_gate(ratio, 0.5, 0.03, teacher_ms=t.median_ms, student_ms=s.median_ms)
    assert not g["passed"] and g["exit_code"] == EXIT_LATENCY and g["threshold"] == pytest.approx(0.515)
    parity = json.loads(rd.parity.read_text())
    budget = {"requested": 0.5, "tolerance": 0.03, "delivered": {"measured_ratio": ratio}}
    v = write_run_verdict(tmp_path, parity, parity, measured_budget=budget, require_budget=True)
    assert _strict(RunDir(tmp_path).verdict) == v and v["kind"] == "run"
    assert not v["passed"] and v["exit_code"] == 4 and v["exit_meaning"] == "latency gate"
    assert {g["subject"] for g in v["gates"] if g["gate"] == "parity"} == {"teacher", "student"}
    assert [g["check"] for g in v["gates"] if not g["passed"]] == ["budget"]
    with pytest.raises(LatencyGateError, match="latency budget") as e:
        raise_for(v)
    assert e.value.exit_code == 4
    # export.require_budget off (the default): the miss is reported, the run passes
    v = write_run_verdict(tmp_path, parity, parity, measured_budget=budget)
    assert v["passed"] and v["exit_code"] == 0 and all(g["gate"] == "parity" for g in v["gates"])
    assert v["info"]["latency_budget"]["within"] is False and v["info"]["latency_budget"]["enforced"] is False
    raise_for(v)  # nothing to raise


def test_merge_gates_adds_a_regression_gate_to_an_existing_verdict(real_release, tmp_path):
    """The hook `vitrim compare` uses: entries merge by (gate, check, subject, output), the exit code is recomputed."""
    rd = RunDir(shutil.copytree(real_release / "rel", tmp_path / "rel"))
    n = len(read_verdict(rd.root)["gates"])
    slower = gate("regression", "latency", 1.08, 1.03, "<=", EXIT_REGRESSION, unit="ratio to the baseline")
    v = merge_gates(rd.root, [slower], kind="run")
    assert len(v["gates"]) == n + 1 and not v["passed"] and v["exit_code"] == 5 and v["kind"] == "run"
    assert read_verdict(rd.verdict) == v and "regression latency FAILED: 1.08, needs <= 1.03" in v["error"]
    with pytest.raises(RegressionGateError) as e:
        raise_for(v)
    assert e.value.exit_code == 5
    v = merge_gates(rd.root, [gate("regression", "latency", 1.01, 1.03, "<=", EXIT_REGRESSION)])  # a rerun passes
    assert len(v["gates"]) == n + 1 and v["passed"] and v["exit_code"] == 0 and v["error"] is None
    # an accuracy failure outranks a regression: the process stops at the first gate it fails
    v = merge_gates(rd.root, [gate("parity", "top1_agreement", 0.5, 0.99, ">=", EXIT_ACCURACY, subject="x"), slower])
    assert v["exit_code"] == 3
    with pytest.raises(AccuracyGateError):
        raise_for(v)
    v = merge_gates(tmp_path / "fresh", [slower])  # no verdict yet: one is created
    assert v["gates"] == [slower] and v["exit_code"] == 5
