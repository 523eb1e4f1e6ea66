"""The README's CI example, end to end on the tiny config: a release job builds a candidate with `vitrim run`,
gates it against the last release with `vitrim compare` (or `export.baseline`), and reads verdict.json and
compare.json. A slower candidate fails with exit 5; the same release again passes; a Triton repository and a
model card come with it."""
import json
import shutil

import pytest
import yaml

from tests.pipeline.stages.test_run import TINY
from vitrim.export.manifest import verify_manifest
from vitrim.pipeline.cli import main
from vitrim.pipeline.core.rundir import RunDir

# The tiny engines run in well under a millisecond at batch 8 on two shared cores; the gate's threshold gets
# room for that noise (the default 3% is for real engines), far below the planted regression (the teacher against
# a student at half its latency).
GATE = ["export.max_latency_regression=0.15", "export.compare_rounds=10", "export.compare_repeats=60"]


def _sets(tmp_path, fmnist_dir, out, *extra):
    out_ = []
    for s in TINY + [f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", f"data.root={fmnist_dir}",
                     "search.measured_rounds=1", *GATE, *extra]:
        out_ += ["--set", s]
    return out_


def _failed(v: dict) -> list:
    return [(g["gate"], g["check"], g["exit_code"]) for g in v["gates"] if not g["passed"]]


@pytest.mark.slow
def test_ci_release_workflow(tmp_path, fmnist_dir, capsys):
    last = tmp_path / "releases" / "last"
    # 1. the last release: a run at 65% of the teacher's latency (a tiny table's smallest plan measured 30-53% of
    # the teacher between builds: 50% was unreachable once), published (copied) where the next job finds it
    assert main(["run", "configs/fmnist_cpu.yaml",
                 *_sets(tmp_path, fmnist_dir, tmp_path / "build" / "b", "search.budget_fraction=0.65")]) == 0
    shutil.copytree(tmp_path / "build" / "b", last)
    verify_manifest(last)  # relocated, it still verifies
    assert json.loads(RunDir(last).verdict.read_text())["passed"]

    # 2. a candidate with a planted regression: the run's teacher release (the whole model, a slower engine;
    # its own gates passed) against the last release; `vitrim compare` exits 5 and leaves the evidence in --out
    gate = RunDir(tmp_path / "gate")
    capsys.readouterr()
    assert main(["compare", str(last), str(tmp_path / "build" / "b" / "teacher"), "--out", str(gate.root),
                 *sum((["--set", s] for s in GATE), [])]) == 5
    printed = capsys.readouterr().out
    assert "| latency, median ms" in printed and "**FAIL**" in printed  # the Markdown table
    c = json.loads(gate.compare.read_text())
    assert not c["passed"] and c["exit_code"] == 5 and c["latency"]["ratio"] > 1.15
    v = json.loads(gate.verdict.read_text())
    assert not v["passed"] and v["exit_code"] == 5 and ("regression", "latency", 5) in _failed(v)

    # 3. a good candidate: the same build again (every stage cached), gated inside the run by export.baseline,
    # with its Triton repository. It passes, and the run's verdict carries the regression entries.
    b = RunDir(tmp_path / "build" / "b")
    triton = tmp_path / "triton"
    assert main(["run", "configs/fmnist_cpu.yaml",
                 *_sets(tmp_path, fmnist_dir, b.root, "search.budget_fraction=0.65", f"export.baseline={last}",
                        f"export.triton={triton}", "export.triton_name=fmnist_tiny")]) == 0
    out = capsys.readouterr().out
    assert "[export] inputs unchanged" in out  # the release-workflow keys do not rebuild the engine
    v = json.loads(b.verdict.read_text())
    assert v["passed"] and v["exit_code"] == 0 and v["kind"] == "run"
    assert {g["check"] for g in v["gates"] if g["gate"] == "regression"} == {"latency", "accuracy"}
    c = json.loads(b.compare.read_text())
    assert c["passed"] and c["accuracy"]["delta_pt"] == 0.0  # the same engine on the same images
    assert (triton / "fmnist_tiny" / "config.pbtxt").is_file() and (triton / "fmnist_tiny" / "1" / "model.onnx").is_file()
    card = b.model_card.read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    metrics = {m["type"]: m for m in front["model-index"][0]["results"][0]["metrics"]}
    s = json.loads(b.summary.read_text())
    assert metrics["speedup"]["value"] == pytest.approx(s["speedup"])  # vitrim run's side-by-side speedup

    # 5. serving copies only after every gate: the release step of a run whose candidate regresses (the slower
    # teacher release against the last release, as in 2) exits 5 and leaves no Triton repository
    from vitrim.export.verdict import raise_for, read_verdict
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.errors import RegressionGateError
    from vitrim.pipeline.stages.compare import finish_release

    cand = RunDir(tmp_path / "candidate")
    shutil.copytree(b.teacher_dir.root, cand.root)
    triton_failed = tmp_path / "triton_failed"
    cfg = load_config("configs/fmnist_cpu.yaml", [f"data.root={fmnist_dir}", f"export.baseline={last}",
                                                  f"export.triton={triton_failed}", *GATE])
    logs: list[str] = []
    verdict = finish_release(cfg, cand, {}, read_verdict(cand.verdict), logs.append)
    assert not verdict["passed"] and verdict["exit_code"] == 5 and ("regression", "latency", 5) in _failed(verdict)
    with pytest.raises(RegressionGateError):
        raise_for(verdict)  # vitrim run exits 5
    assert not triton_failed.exists()  # nothing servable
    assert any("[triton] not written: the release failed a gate (exit 5" in m for m in logs), logs

    # 4. `vitrim export --triton` lays out the same kind of repository for a release made by hand
    assert main(["export", "configs/fmnist_cpu.yaml", "--student", str(b.root), "--out", str(tmp_path / "by_hand"),
                 "--triton", str(tmp_path / "triton2"), "--no-lut",
                 *_sets(tmp_path, fmnist_dir, tmp_path / "unused")]) == 0
    assert (tmp_path / "triton2" / "fmnist_cpu" / "config.pbtxt").is_file()  # named after the config's name
