"""`vitrim run` writes verdict.json (issue 24): both releases' parity gates, and with export.require_budget the
delivered latency against the budget, exit 4 when it is missed; one tiny run, then cached reruns."""
import json

import pytest

from tests.conftest import TINY_KW
from vitrim.pipeline.cli import main
from vitrim.pipeline.core.rundir import RunDir


@pytest.fixture
def run_args(tmp_path, fmnist_dir, tiny_lut):
    """`vitrim run` of the tiny ViT on a small real slice, priced by the session's tiny LUT (batch 4, 1 thread;
    built once for the profiling tests): the verdict needs real releases and a real closed loop, not a good student."""
    kw = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_KW.items()) + "}"

    def args(*extra):
        out = ["run", "configs/fmnist_cpu.yaml"]
        for s in [f"out_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"data.root={fmnist_dir}",
                  "data.train_limit=256", "data.val_limit=64", "data.test_limit=128", "data.batch_size=64",
                  f"model.kwargs={kw}", "teacher.epochs=1", "teacher.lr=0.003", "target.batch=4", "target.threads=1",
                  f"profile.lut={tiny_lut[1]}", "profile.warmup=2", "profile.repeats=6", "profile.rounds=2", "profile.min_visit_ms=0",
                  "search.budget_fraction=0.7", "search.steps=1", "search.kd_iters=2", "search.saliency_batches=1",
                  "search.measured_rounds=1", "finetune.epochs=1",
                  "model.chance_check=false",  # 4 teacher steps: about 20% top-1, near the chance check's floor
                  *extra]:
            out += ["--set", s]
        return out

    return args


def _with_requested(rd: RunDir, requested: float) -> None:
    """The closed loop's record of the requested ratio, rewritten: a budget the delivered engine cannot meet (or
    easily meets) without a second search; every stage stays cached, the rerun re-times and re-decides."""
    p = rd.search_dir.measured_budget
    m = json.loads(p.read_text())
    m["requested"] = requested
    p.write_text(json.dumps(m))


@pytest.mark.slow
def test_run_verdict_and_the_latency_gate_exit_4(tmp_path, run_args, capsys):
    args = run_args("export.require_budget=true")
    rc = main(args)
    rd = RunDir(tmp_path / "run")
    v = json.loads(rd.verdict.read_text())
    assert v["kind"] == "run" and {g["subject"] for g in v["gates"] if g["gate"] == "parity"} == {"teacher", "student"}
    (lat,) = [g for g in v["gates"] if g["gate"] == "latency"]
    s = json.loads(rd.summary.read_text())
    d, mb = s["measured_budget"]["delivered"], s["measured_budget"]
    assert lat["measured"] == pytest.approx(d["measured_ratio"]) and lat["threshold"] == \
        pytest.approx(mb["requested"] * (1 + mb["tolerance"]))
    # whatever this machine measured, the exit code, the verdict and the figures agree
    assert (rc, v["exit_code"], v["passed"]) == ((0, 0, True) if lat["passed"] else (4, 4, False))
    assert lat["passed"] == (d["measured_ratio"] <= mb["requested"] * (1 + mb["tolerance"]))

    _with_requested(rd, 0.05)  # 5% of the teacher: no engine of this run gets there
    capsys.readouterr()
    assert main(args) == 4
    assert "latency budget" in capsys.readouterr().err
    v = json.loads(rd.verdict.read_text())
    failed = [(g["gate"], g["check"], g["exit_code"]) for g in v["gates"] if not g["passed"]]
    assert not v["passed"] and v["exit_code"] == 4 and failed == [("latency", "budget", 4)]
    assert rd.summary.is_file() and rd.report.is_file()  # the evidence stays on disk

    _with_requested(rd, 5.0)  # five times the teacher: any engine meets it
    assert main(args) == 0 and json.loads(rd.verdict.read_text())["passed"]


def test_require_budget_without_a_measured_loop_is_a_user_error(tmp_path, run_args, capsys):
    assert main(run_args("export.require_budget=true", "search.strategy=uniform")) == 2
    assert "export.require_budget" in capsys.readouterr().err
    rc = main(run_args("export.require_budget=true", "search.budget_fraction=null", "search.flops_fraction=0.5"))
    assert rc == 2 and "needs a latency budget" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # refused before any work


def test_a_baseline_that_is_no_release_is_refused_before_any_work(tmp_path, run_args, capsys):
    (tmp_path / "empty").mkdir()
    assert main(run_args(f"export.baseline={tmp_path / 'empty'}")) == 2
    err = capsys.readouterr().err
    assert "export.baseline" in err and "holds no release" in err and "first release" in err
    assert main(run_args("export.require_budget=true", "target.backend=torch-cpu")) == 2
    assert "export.require_budget" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
