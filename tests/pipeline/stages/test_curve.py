"""`vitrim curve`: points over seeds, re-timed together in one session, run as jobs (--point/--collect), progressive."""
import csv
import io
import json
import math
import shutil
from contextlib import redirect_stdout

import pytest
import yaml

from vitrim.pipeline.cli import main
from vitrim.pipeline.core.config import load_config
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.stages.curve import collect_curve, curve_points
from vitrim.profiling.curve import method_differences, wall_times, write_curve, write_curve_report
from tests.pipeline.stages.test_run import sets

FAST = ["finetune.epochs=1", "search.steps=1", "search.measured_rounds=0"]  # the closed loop measures, corrects none


def rows_of(path):
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vitrim-curve-cache")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, fmnist_dir, cache):
    """`vitrim curve --budgets 0.8,0.6 --seeds 2` (the config's strategy only), with every call of the session
    timing helper recorded."""
    import vitrim.export.runners as runners

    tmp = tmp_path_factory.mktemp("curve")
    calls, real = [], runners.time_ratio

    def recording(rs, *a, **kw):
        out = real(rs, *a, **kw)
        calls.append({"runners": len(rs), "timings": out[0], "ratios": out[1]})
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(runners, "time_ratio", recording)
    try:
        rc = main(["curve", "configs/fmnist_cpu.yaml", "--budgets", "0.8,0.6", "--seeds", "2", "--baselines", "",
                   "--curves", "independent", *sets(tmp, [f"data.root={fmnist_dir}", *FAST], cache)])
    finally:
        mp.undo()
    assert rc == 0
    return tmp / "run", calls


@pytest.mark.slow
def test_seeds_give_a_row_each_timed_in_one_session_with_the_teacher(seeded):
    run, calls = seeded
    rows = rows_of(run / "curve.csv")
    assert rows[0]["method"] == "teacher" and float(rows[0]["session_speedup"]) == 1.0
    points = rows[1:]
    assert sorted((r["budget"], r["seed"]) for r in points) == [("0.6", "0"), ("0.6", "1"), ("0.8", "0"), ("0.8", "1")]
    # the curve's figures come from one session of all five engines, after every point had run: drop that call
    # and the session columns have nowhere to come from
    assert len(calls) == 1 and calls[0]["runners"] == 1 + len(points)
    t = calls[0]["timings"]
    assert float(rows[0]["session_ms"]) == pytest.approx(t[0].median_ms, abs=1e-4)
    for r, tm, ratio in zip(points, t[1:], calls[0]["ratios"]):
        assert float(r["session_ms"]) == pytest.approx(tm.median_ms, abs=1e-4)
        assert float(r["session_speedup"]) == pytest.approx(1 / ratio, abs=1e-4)
        assert float(r["run_measured_ms"]) > 0 and float(r["run_speedup"]) > 0  # each run's own figures beside
    # two seeds are two runs: the search and the fine-tune seeded apart
    assert len({r["run_dir"] for r in points}) == 4
    seeds = {yaml.safe_load((run / r["run_dir"] / "resolved_config.yaml").read_text())["search"]["seed"] for r in points}
    assert seeds == {0, 1}
    assert (run / "curve.png").stat().st_size > 2000
    md = (run / "curve.md").read_text()
    assert "one session" in md and "| knapsack | 0.8 | 2 |" in md and "No budget has more than one method" in md


@pytest.mark.slow
def test_points_as_jobs_and_collect_give_the_rows_of_one_run(seeded, tmp_path, fmnist_dir, cache, capsys):
    run, _ = seeded
    opts = ["configs/fmnist_cpu.yaml", "--budgets", "0.8,0.6", "--seeds", "2", "--baselines", "", "--curves",
            "independent"]
    jobs = tmp_path / "jobs"
    cfg_sets = sets(tmp_path, [f"data.root={fmnist_dir}", *FAST, f"out_dir={jobs}"], cache)
    assert main(["curve", *opts, "--list", *cfg_sets]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln[:1].isdigit()]
    assert [ln.split("\t")[1] for ln in listed] == ["knapsack@0.8 seed 0", "knapsack@0.6 seed 0",
                                                    "knapsack@0.8 seed 1", "knapsack@0.6 seed 1"]
    # the jobs of an array: the points already run by the single run are copied in, as finished jobs' outputs
    # would be; point 3 runs here as a job
    for k in (0, 1, 2):
        d = rows_of(run / "curve.csv")[1:][k]["run_dir"]
        shutil.copytree(run / d, jobs / d)
    assert main(["curve", *opts, "--collect", str(jobs), *cfg_sets]) == 2  # nothing recorded as finished yet
    assert main(["curve", *opts, "--point", "3", *cfg_sets]) == 0
    for k in (0, 1, 2):
        shutil.copy(run / "points" / f"{rows_of(run / 'curve.csv')[1:][k]['run_dir']}.json", jobs / "points")
    assert main(["curve", *opts, "--collect", str(jobs), *cfg_sets]) == 0
    key = lambda rows: sorted((r["method"], r["budget"], r["seed"], r["run_dir"]) for r in rows)  # noqa: E731
    assert key(rows_of(jobs / "curve.csv")) == key(rows_of(run / "curve.csv"))
    assert (jobs / "curve.png").is_file() and (jobs / "curve.md").is_file()


def test_a_missing_point_is_named(tmp_path):
    cfg = load_config("configs/fmnist_cpu.yaml", [f"out_dir={tmp_path}"])
    points = curve_points(cfg, [0.6, 0.3], ["uniform"], seeds=2, curves=["independent"])
    (tmp_path / "points").mkdir()
    for p in points[:-1]:  # every point but the last recorded as unreachable: no engine to time
        (tmp_path / "points" / f"{p.method}_{p.budget:g}{f'_s{p.seed}' if p.seed else ''}.json").write_text(
            json.dumps({"status": "unreachable", "reason": "test"}))
    with pytest.raises(UserError) as e:  # exit 2
        collect_curve(cfg, points, log=lambda s: None)
    msg = str(e.value) + str(e.value.fix)
    assert "1 of 8 points" in msg and "7 (uniform@0.3 seed 1" in msg and "uniform_0.3_s1" in msg and "--point" in msg


def test_a_progressive_point_passes_over_an_unreachable_point_above_it(tmp_path):
    """A chain 0.6 -> 0.45 -> 0.3 whose 0.45 point could not reach its budget: the 0.3 point continues from the 0.6
    point's student, not from the teacher; with no point above finished it exits 2 naming the one to run first."""
    from vitrim.pipeline.core.rundir import RunDir
    from vitrim.pipeline.stages.curve import continue_from, point_dir

    cfg = load_config("configs/fmnist_cpu.yaml", [f"out_dir={tmp_path}"])
    pts = curve_points(cfg, [0.6, 0.45, 0.3], [], seeds=1)  # the default curve, progressive-ft: one chain
    assert [p.after for p in pts] == [None, 0, 1]
    base = RunDir(tmp_path)
    with pytest.raises(UserError) as e:
        continue_from(base, pts, pts[2])
    assert "continues from point 1" in str(e.value) and "--point 1" in e.value.fix
    head = point_dir(base, pts, pts[0]).mkdir()
    (head.root / "summary.json").write_text("{}")
    (tmp_path / "points").mkdir()
    for p, status in ((pts[0], "done"), (pts[1], "unreachable")):
        base.curve_outcome(point_dir(base, pts, p).root.name).write_text(json.dumps({"status": status}))
    said = []
    assert continue_from(base, pts, pts[2], said.append) == pts[0]
    assert continue_from(base, pts, pts[1]) == pts[0] and continue_from(base, pts, pts[0]) is None
    assert said and "point 1 (knapsack@0.45 seed 0) did not reach its budget" in said[0]
    base.curve_outcome(head.root.name).write_text(json.dumps({"status": "unreachable"}))
    assert continue_from(base, pts, pts[2]) is None  # none above reached its budget: from the teacher


def test_points_are_listed_in_a_fixed_order_and_progressive_ones_chain():
    cfg = load_config("configs/fmnist_cpu.yaml")
    pts = curve_points(cfg, [0.3, 0.6, 0.45], ["uniform"], seeds=2, curves="progressive")
    assert [(p.method, p.budget, p.seed) for p in pts[:3]] == [("knapsack", 0.6, 0), ("knapsack", 0.45, 0),
                                                              ("knapsack", 0.3, 0)]
    assert [p.after for p in pts[:6]] == [None, 0, 1, None, 3, 4]
    assert all(p.after is None for p in pts if p.method == "uniform")  # uniform cannot continue a plan
    independent = curve_points(cfg, [0.3, 0.6], ["uniform"], seeds=1, curves=["independent"])
    assert [(p.method, p.budget) for p in independent] == [("knapsack", 0.3), ("knapsack", 0.6), ("uniform", 0.3),
                                                          ("uniform", 0.6)]


def _row(method, budget, seed, ratio, top1):
    return {"method": method, "budget": budget, "seed": seed, "session_speedup": 1 / ratio, "top1": top1,
            "session_ms": 2.0 * ratio}


def test_report_says_which_method_differences_exceed_the_seed_spread(tmp_path):
    rows = [_row("teacher", 1.0, "", 1.0, 90.0),  # 3 seeds a point
            _row("knapsack", 0.5, 0, 0.50, 89.0), _row("knapsack", 0.5, 1, 0.52, 89.4), _row("knapsack", 0.5, 2, 0.51, 89.2),
            _row("uniform", 0.5, 0, 0.51, 87.0), _row("uniform", 0.5, 1, 0.50, 87.3), _row("uniform", 0.5, 2, 0.52, 87.1),
            # 0.3: ranges that do not overlap by a hair, with a spread as large as the difference: not decided
            _row("knapsack", 0.3, 0, 0.30, 88.0), _row("knapsack", 0.3, 1, 0.31, 86.0), _row("knapsack", 0.3, 2, 0.30, 87.0),
            _row("uniform", 0.3, 0, 0.33, 85.9), _row("uniform", 0.3, 1, 0.34, 84.0), _row("uniform", 0.3, 2, 0.335, 85.0)]
    d = {dd["budget"]: dd for dd in method_differences(rows)}
    assert d[0.5]["top1_exceeds"] is True and d[0.5]["top1_p"] < 0.05 and d[0.5]["ratio_exceeds"] is False
    assert min(r["top1"] for r in rows[7:10]) > max(r["top1"] for r in rows[10:])  # 0.3: disjoint ranges, yet
    assert d[0.3]["top1_exceeds"] is False and d[0.3]["ratio_exceeds"] is True
    assert d[0.5]["top1_diff"] == pytest.approx(2.0667, abs=1e-3)
    md = write_curve_report(rows, tmp_path, "t", protocol="one session").read_text()
    assert "Welch's t-test" in md and "1 in 10 with 3" in md
    assert "| 0.5 | knapsack - uniform | 3, 3 | +2.07 | **exceeds the seed spread** (p=" in md
    assert "| 0.3 | knapsack - uniform | 3, 3 | +2.03 | within seed spread (p=" in md
    one = method_differences([r for r in rows if r["seed"] in ("", 0)])
    assert all(dd["top1_exceeds"] is None for dd in one)  # one seed: no spread, nothing decided
    _, png = write_curve(rows, tmp_path, "t")
    assert png.stat().st_size > 2000


@pytest.fixture(scope="module")
def progressive(seeded, tmp_path_factory, fmnist_dir, cache):
    """One directory holding the independent curve (0.8 and 0.6, copied in from `seeded` as finished jobs), and
    both progressive chains from its 0.8 point: `--curves independent,progressive,progressive-ft`, points 2 and 3 run
    as jobs, each one's output kept, then collected."""
    run, _ = seeded
    tmp = tmp_path_factory.mktemp("prog")
    prog = tmp / "prog"
    opts = ["configs/fmnist_cpu.yaml", "--budgets", "0.6,0.8", "--baselines", "", "--curves",
            "independent,progressive,progressive-ft"]
    cfg_sets = sets(tmp, [f"data.root={fmnist_dir}", *FAST, f"out_dir={prog}"], cache)
    (prog / "points").mkdir(parents=True)
    for d in ("knapsack_0.8", "knapsack_0.6"):  # points 0 and 1: from the teacher, finished jobs
        shutil.copytree(run / d, prog / d)
        shutil.copy(run / "points" / f"{d}.json", prog / "points")
    outs = {}
    for k in (2, 3):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["curve", *opts, "--point", str(k), *cfg_sets,  # a continued point's own recipe
                         "--continue-set", "finetune.warmup_epochs=0.2"]) == 0
        outs[k] = buf.getvalue().replace(str(prog) + "/", "")
    assert main(["curve", *opts, "--collect", *cfg_sets]) == 0
    return prog, outs


@pytest.mark.slow
def test_progressive_points_continue_from_the_previous_budgets_plan(progressive):
    prog, outs = progressive
    assert "continuing from point 0 (knapsack@0.8 seed 0)" in outs[2]
    assert "[search] continuing from an earlier plan" in outs[2]
    a = Plan.load(prog / "knapsack_0.8" / "plan.json")
    b = Plan.load(prog / "knapsack_0.6_from0.8" / "plan.json")
    assert set(b.embed_keep) <= set(a.embed_keep)
    for ba, bb in zip(a.blocks, b.blocks):  # b only removes from a's plan: its kept units are a subset
        assert ba.keep or not bb.keep
        if bb.keep:
            assert all(set(getattr(bb, d)) <= set(getattr(ba, d)) for d in ("heads", "qk", "v", "mlp"))
    log_a = json.loads((prog / "knapsack_0.8" / "search" / "search_log.json").read_text())
    log_b = json.loads((prog / "knapsack_0.6_from0.8" / "search" / "search_log.json").read_text())
    assert log_b["steps"][0]["cost"] == pytest.approx(log_a["steps"][-1]["cost"], rel=1e-9)  # fell from a's cost
    assert log_a["steps"][0]["cost"] > log_a["steps"][-1]["cost"]  # a's own search fell from the teacher's


@pytest.mark.slow
def test_progressive_finetune_continues_from_the_previous_fine_tuned_student(progressive):
    prog, outs = progressive
    assert "knapsack_0.8's plan and its fine-tuned student" in outs[3]
    resolved = yaml.safe_load((prog / "knapsack_0.6_from0.8ft" / "resolved_config.yaml").read_text())
    assert resolved["search"]["start_weights"] == "student" and resolved["search"]["start_from"].endswith("knapsack_0.8")
    assert resolved["finetune"]["warmup_epochs"] == 0.2  # --continue-set: the continued point's recipe


def test_continue_set_changes_only_a_continued_points_recipe(tmp_path, monkeypatch, capsys):
    """--continue-set: the recipe of the points that continue from another; the head, an independent point and a
    point none of whose points above reached its budget (it starts from the teacher) keep the config's, and the
    seed offset still applies. Checked before any point runs."""
    import vitrim.pipeline.stages.run as run_stage
    from vitrim.pipeline.core.rundir import RunDir
    from vitrim.pipeline.stages.curve import continue_config, point_dir, run_point

    assert continue_config("configs/fmnist_cpu.yaml", [], []) is None
    cont = continue_config("configs/fmnist_cpu.yaml", ["finetune.epochs=5"], ["finetune.epochs=1", "search.steps=2"])
    assert cont.keys == {("finetune", "epochs"): 1, ("search", "steps"): 2}  # after --set
    for bad in ("model.arch=vit_small_patch16_224", "out_dir=x", "finetune.epochs", "search.prune_tokens=true",
                "search.align=16", "search.strategy=uniform", "search.seed=3", "search.budget_fraction=0.1",
                "finetune.seed=4"):
        with pytest.raises(UserError) as e:
            continue_config("configs/fmnist_cpu.yaml", [], [bad])
        assert bad in str(e.value) and "finetune." in e.value.fix
    for mode in (["--point", "1"], ["--list"], ["--chain", "0"], ["--collect"]):  # before any point runs
        assert main(["curve", "configs/fmnist_cpu.yaml", "--budgets", "0.6,0.3", "--continue-set",
                     "finetune.epochs=-1", *mode]) == 2
        err = capsys.readouterr().err
        assert "--continue-set finetune.epochs=-1" in err and "'finetune.epochs' is -1" in err

    ran = {}  # the config each point's run would get (the pipeline itself is not what this test is about)
    monkeypatch.setattr(run_stage, "run_pipeline", lambda c, log=print: ran.__setitem__(c.out_dir, c))
    cfg = load_config("configs/fmnist_cpu.yaml", [f"out_dir={tmp_path}", "finetune.epochs=3", "finetune.lr=0.002"])
    pts = curve_points(cfg, [0.6, 0.3], [], seeds=2, curves=["independent", "progressive-ft"])
    assert [(p.budget, p.seed, p.after) for p in pts[3:]] == [(0.6, 1, None), (0.3, 1, None), (0.3, 1, 3)]  # seed 1
    base = RunDir(tmp_path)
    (tmp_path / "points").mkdir()
    for k in (3, 4):
        assert "continue_set" not in run_point(cfg, pts, k, cont=cont)  # the head and the independent point
    for k, epochs in ((3, 3), (4, 3)):
        assert ran[str(point_dir(base, pts, pts[k]).root)].finetune.epochs == epochs
    (point_dir(base, pts, pts[3]).mkdir().root / "summary.json").write_text("{}")
    rec = run_point(cfg, pts, 5, cont=cont)
    c = ran[str(point_dir(base, pts, pts[5]).root)]
    assert (c.finetune.epochs, c.search.steps, c.search.start_weights) == (1, 2, "student")
    assert c.finetune.lr == 0.002  # the curve's other keys stay (the recipe is laid over them)
    assert c.finetune.seed == cfg.finetune.seed + 1 and rec["continue_set"] == ["finetune.epochs=1", "search.steps=2"]
    base.curve_outcome(point_dir(base, pts, pts[3]).root.name).write_text(json.dumps({"status": "unreachable"}))
    run_point(cfg, pts, 5, cont=cont)  # nothing above it reached its budget: from the teacher, the config's recipe
    assert ran[str(point_dir(base, pts, pts[5]).root)].finetune.epochs == 3


@pytest.mark.slow
def test_progressive_and_independent_curves_are_timed_in_one_session_and_compared(progressive):
    """The head (0.8, from the teacher) is one run with a row in each curve; the three 0.6 points are three runs;
    every curve's wall time is reported, a progressive one's over the independent one's."""
    prog, _ = progressive
    rows = rows_of(prog / "curve.csv")[1:]
    by = {(r["method"], r["budget"]): r for r in rows}
    assert sorted(by) == sorted((m, b) for m in ("knapsack", "knapsack progressive", "knapsack progressive-ft")
                                for b in ("0.8", "0.6"))
    heads = [by[m, "0.8"] for m in ("knapsack", "knapsack progressive", "knapsack progressive-ft")]
    assert {r["run_dir"] for r in heads} == {"knapsack_0.8"} and len({r["session_ms"] for r in heads}) == 1
    assert [by[m, "0.6"]["run_dir"] for m in ("knapsack", "knapsack progressive", "knapsack progressive-ft")] == \
        ["knapsack_0.6", "knapsack_0.6_from0.8", "knapsack_0.6_from0.8ft"]
    assert by["knapsack progressive", "0.6"]["start_from"] == "knapsack_0.8"
    assert all(float(r["wall_s"]) > 0 for r in rows)
    md = (prog / "curve.md").read_text()
    assert "Progressive curves (progressive, progressive-ft)" in md and "## Wall time per curve" in md
    walls = wall_times(rows)
    ratio = walls["knapsack progressive"][0] / walls["knapsack"][0]
    assert f"| knapsack progressive | 1 | {walls['knapsack progressive'][0] / 60:.1f} | {ratio:.2f}x |" in md
    assert "| knapsack - knapsack progressive |" in md  # compared at each budget (one seed: not decided)


def test_a_progressive_curve_lists_each_chain_from_one_head():
    cfg = load_config("configs/fmnist_cpu.yaml")
    pts = curve_points(cfg, [0.3, 0.6, 0.45], ["uniform"], seeds=2,
                       curves=["independent", "progressive", "progressive-ft"])
    s0 = [p for p in pts if p.method == "knapsack" and p.seed == 0]
    assert [(p.budget, p.after, p.mode) for p in s0] == [
        (0.6, None, None), (0.45, None, None), (0.3, None, None),  # the independent curve, its 0.6 the head
        (0.45, 0, "progressive"), (0.3, 3, "progressive"), (0.45, 0, "progressive-ft"), (0.3, 5, "progressive-ft")]
    assert s0[0].names() == ["knapsack", "knapsack progressive", "knapsack progressive-ft"]
    assert all(p.after is None and p.names() == ["uniform"] for p in pts if p.method == "uniform")
    alone = curve_points(cfg, [0.3, 0.6], [], seeds=1)  # the default, progressive-ft: the head in its chain only
    assert [(p.budget, p.after, p.names()) for p in alone] == [(0.6, None, ["knapsack progressive-ft"]),
                                                                (0.3, 0, ["knapsack progressive-ft"])]


def test_a_progressive_curve_runs_as_one_job_per_chain(capsys):
    """`--chain J`: a point and the points that continue from it are one job; independent points one job each."""
    from vitrim.pipeline.stages.curve import curve_chains

    cfg = load_config("configs/fmnist_cpu.yaml")
    pts = curve_points(cfg, [0.6, 0.3, 0.45], ["uniform"], seeds=2, curves=["independent", "progressive-ft"])
    chains = curve_chains(pts)
    assert sorted(k for c in chains for k in c) == list(range(len(pts)))  # every point in exactly one job
    for c in chains:  # each job runs a point after the point it continues from
        assert all(pts[k].after is None or pts[k].after in c[:c.index(k)] for k in c)
    s0 = [p.index for p in pts if p.method == "knapsack" and p.seed == 0]
    assert chains[0] == [s0[0], s0[3], s0[4]] and [s0[1]] in chains and [s0[2]] in chains  # head + its chain
    assert main(["curve", "configs/fmnist_cpu.yaml", "--budgets", "0.6,0.3", "--list"]) == 0
    out = capsys.readouterr().out
    assert ("1\tknapsack@0.3 seed 0 (continues from point 0, or the nearest point above it that reaches its budget: "
            "knapsack progressive-ft)\tchain 0") in out
    assert "chains: 3 (--chain 0..2" in out
    assert main(["curve", "configs/fmnist_cpu.yaml", "--budgets", "0.6,0.3", "--chain", "3"]) == 2
    assert "this curve has chains 0..2" in capsys.readouterr().err
    one = curve_points(cfg, [0.6], [], seeds=1)  # one budget: nothing to continue, the plain strategy's curve
    assert [(p.after, p.names()) for p in one] == [(None, ["knapsack"])]


def test_an_unknown_curve_is_refused_naming_the_curves(capsys):
    for bad in ("independent,progresive", ""):
        assert main(["curve", "configs/fmnist_cpu.yaml", "--curves", bad, "--list"]) == 2
        err = capsys.readouterr().err
        assert "--curves" in err and "independent, progressive, progressive-ft" in err, err


def test_wall_time_per_curve_is_summed_per_seed_and_compared_seed_by_seed(tmp_path):
    rows = [_row("teacher", 1.0, "", 1.0, 90.0)]
    for seed, (a, b, c) in enumerate([(100.0, 60.0, 50.0), (120.0, 60.0, 70.0)]):
        rows += [dict(_row("knapsack", 0.6, seed, 0.6, 89.0), wall_s=a),
                 dict(_row("knapsack", 0.3, seed, 0.3, 88.0), wall_s=b),
                 dict(_row("knapsack progressive", 0.6, seed, 0.6, 89.0), wall_s=a),  # the head: in each curve
                 dict(_row("knapsack progressive", 0.3, seed, 0.31, 88.1), wall_s=c)]
    assert wall_times(rows) == {"knapsack": {0: 160.0, 1: 180.0}, "knapsack progressive": {0: 150.0, 1: 190.0}}
    unknown = rows + [dict(_row("knapsack", 0.6, 2, 0.6, 89.0), wall_s=90.0),  # a seed with a run of unknown cost
                      dict(_row("knapsack", 0.3, 2, 0.3, 88.0), wall_s=float("nan"))]
    assert wall_times(unknown)["knapsack"] == {0: 160.0, 1: 180.0}
    md = write_curve_report(rows, tmp_path, "t", protocol="one session", progressive=[("progressive", "from the plan above")]).read_text()
    # 150/160 = 0.9375, 190/180 = 1.0556: mean 0.996
    assert "| knapsack progressive | 2 | 2.8 [2.5, 3.2] | 1.00 [0.94, 1.06]x |" in md
    assert "| knapsack | 2 | 2.8 [2.7, 3.0] |  |" in md


def test_a_strategy_that_cannot_continue_is_refused_before_any_training(tmp_path, capsys):
    """search.start_from with `uniform`: exit 2 at once (no teacher trained, no table built), naming the strategies
    that can continue a plan."""
    for cmd in ("run", "search"):
        code = main([cmd, "configs/fmnist_cpu.yaml", "--set", f"search.start_from={tmp_path}", "--set",
                     "search.strategy=uniform", "--set", f"cache_dir={tmp_path / 'cache'}", "--set",
                     f"out_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert code == 2 and "cannot start from an earlier plan" in err and "knapsack" in err, err
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_point_and_collect_are_one_or_the_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["curve", "configs/fmnist_cpu.yaml", "--point", "0", "--collect", str(tmp_path)])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_points_cost_is_its_work_s_and_unknown_when_an_older_summary_reused_a_stage():
    from vitrim.pipeline.stages.curve import _work_s
    assert _work_s({"work_s": 120.5, "wall_s": 3.0}) == 120.5  # a rerun counts what its reused stages took
    assert math.isnan(_work_s({"work_s": None, "wall_s": 3.0}))  # a stage's time was not recorded
    # summaries older than work_s: their wall time when every stage ran, unknown when any was reused
    assert _work_s({"wall_s": 80.0, "timings": {"search_s": 40.0, "finetune_s": 30.0}}) == 80.0
    assert math.isnan(_work_s({"wall_s": 5.0, "timings": {"search_s": "cached", "finetune_s": 3.0}}))
    assert math.isnan(_work_s({"timings": {}}))
