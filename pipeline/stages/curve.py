"""``vitrim curve CONFIG --budgets ...``: a latency-accuracy curve, one ``vitrim run`` a point, timed in one session.

A point is a strategy at a budget with one seed (``--seeds N``: the seeds ``search.seed + k`` and
``finetune.seed + k``, k < N). The points form a fixed list (:func:`curve_points`: strategies, then seeds, then
budgets) that ``--list`` prints, so each can run as an independent job (``--point K``) into the curve's directory;
the teacher and the LUT are shared files of the cache (:func:`~vitrim.pipeline.stages.cache.prepare_cache`).

The curve is assembled by :func:`collect_curve` (``--collect``, and at the end of a whole ``vitrim curve``): every
finished point's engine and the teacher's are re-timed together in one round-robin session
(:func:`vitrim.export.runners.time_ratio`, each point bracketed by teacher visits), because milliseconds measured
in different sessions of a shared machine move by 10-70%. The plot and the report use that session's ratios; the
CSV keeps each run's own figures beside them.

Three curves per strategy (``--curves``, :data:`CURVES`): ``independent`` runs every budget from the teacher;
``progressive`` runs the budgets high to low, the search for b starting from a's searched plan and adapted weights
(``search.start_from``); ``progressive-ft``, the default, starts it from a's fine-tuned student
(``search.start_weights: student``), so b's search and fine-tune descend from a's student. It is the default
because it was measured no worse at equal measured latency (better at 30% of the teacher, beyond the seed
spread; benchmarks/README.md, issue 36). Strategies that cannot continue a plan (``Strategy.continues``) run
their points independently. Several curves in one directory share their head (the highest budget's point, run
once, from the teacher): each point belongs to one or more *series*, and the collect re-times them all in the one
session, so they compare at equal measured latency, and by their wall time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from vitrim.pipeline.core.config import RunConfig
from vitrim.pipeline.core.errors import UnreachableBudget, UserError
from vitrim.pipeline.core.io import atomic_write_json, read_json
from vitrim.pipeline.core.rundir import RunDir

INDEPENDENT = "independent"
CURVES = {  # --curves: what each point starts from (its search.start_weights; None: the teacher), as curve.md says it
    INDEPENDENT: (None, "every budget from the teacher"),
    "progressive": ("search", "each budget's search started from the next higher budget's plan and adapted weights"),
    "progressive-ft": ("student", "from the next higher budget's plan and fine-tuned student"),
}
DEFAULT_CURVES = ("progressive-ft",)  # no worse at equal measured latency than independent points (issue 36)


def series_name(method: str, curve: str) -> str:
    """The name of a curve in the plot and the report: ``knapsack``, ``knapsack progressive``, ..."""
    return method if curve == INDEPENDENT else f"{method} {curve}"


@dataclass(frozen=True)
class CurvePoint:
    """One point of a curve: ``method`` at ``budget`` with the ``seed``-th seed; ``after``: the index of the point
    a progressive point continues from (None: from the teacher), ``mode`` the progressive curve it continues in (a
    key of :data:`CURVES`); ``series``: the curves the point belongs to (the head of the chains belongs to each)."""

    index: int
    method: str
    budget: float
    seed: int
    after: Optional[int] = None
    mode: Optional[str] = None
    series: tuple = (INDEPENDENT,)

    def label(self) -> str:
        return f"{self.method}@{self.budget:g} seed {self.seed}"

    def names(self) -> list[str]:
        return [series_name(self.method, s) for s in self.series]


def curve_points(cfg: RunConfig, budgets: list[float], baselines: list[str], seeds: int = 1,
                 curves: Sequence[str] = DEFAULT_CURVES) -> list[CurvePoint]:
    """The curve's points in their fixed order (``--point K`` is an index into it): the config's strategy then the
    baselines, each seed; per seed the independent points (``curves`` naming ``independent``), then each
    progressive curve's chain, highest budget first, each point continuing from the one before. The highest
    budget's point starts from the teacher and heads every chain (one run). A strategy that cannot continue a plan
    gets independent points only. An unknown curve name is a UserError."""
    from vitrim.pipeline.search import strategy

    curves = [curves] if isinstance(curves, str) else list(curves)
    bad = [c for c in curves if c not in CURVES]
    if bad or not curves:
        raise UserError("curve", f"--curves {','.join(curves)}: " + (f"unknown curve '{bad[0]}'" if bad else "none"),
                        f"use one or more of {', '.join(CURVES)}, comma-separated")
    modes = [c for c in dict.fromkeys(curves) if CURVES[c][0]]
    independent = INDEPENDENT in curves
    methods = list(dict.fromkeys([cfg.search.strategy, *baselines]))
    order = list(dict.fromkeys(sorted(budgets, reverse=True) if modes else budgets))
    points: list[CurvePoint] = []

    def add(*a, **kw) -> int:
        points.append(CurvePoint(len(points), *a, **kw))
        return points[-1].index

    for m in methods:
        chains = tuple(md for md in modes if strategy(m).continues) if len(order) > 1 else ()  # one budget: no chain
        own = independent or not chains
        for k in range(max(1, seeds)):
            head = None
            if own:
                for b in order:
                    i = add(m, b, k, series=(INDEPENDENT, *chains) if chains and b == order[0] else (INDEPENDENT,))
                    head = i if b == order[0] else head
            elif chains:
                head = add(m, order[0], k, series=chains)
            for md in chains:
                prev = head
                for b in order[1:]:
                    prev = add(m, b, k, prev, md, (md,))
    return points


def curve_chains(points: list[CurvePoint]) -> list[list[int]]:
    """The points grouped into jobs that can run in parallel (``--chain J``): a point that continues another runs in
    the same job, after it; every other point is a job of its own. Jobs are ordered by their first point."""
    root = {}
    for p in points:  # a point's predecessor comes before it in the list
        root[p.index] = root[p.after] if p.after is not None else p.index
    chains: dict[int, list[int]] = {}
    for p in points:
        chains.setdefault(root[p.index], []).append(p.index)
    return list(chains.values())


def point_dir(base: RunDir, points: list[CurvePoint], p: CurvePoint) -> RunDir:
    """Where point ``p`` runs: a progressive point's name says which budget it follows in its chain (``ft``: from
    its fine-tuned student; its outcome's ``start_from`` says which point it continued from, higher up when that
    one's budget was unreachable)."""
    tag = ""
    if p.after is not None:
        tag = f"_from{points[p.after].budget:g}{'ft' if CURVES[p.mode][0] == 'student' else ''}"
    return base.curve_run(p.method, p.budget, p.seed, tag)


def curve_point(cfg: RunConfig, method: str, budget: float, seed: int = 0) -> RunConfig:
    """The config of one curve point: ``cfg`` with strategy ``method`` at ``budget`` of the teacher's latency, the
    ``seed``-th seed added to the search's and the fine-tune's, and what that strategy does not do turned off
    (token merges, prune-finetune steps, the budget gate of a plan the closed loop cannot correct: that point is
    timed, not gated)."""
    from vitrim.pipeline.search import for_strategy, strategy

    c = copy.deepcopy(cfg)
    c.search = for_strategy(cfg.search, method)
    c.export.require_budget = cfg.export.require_budget and strategy(method).correctable
    c.search.budget_fraction, c.search.budget_ms = budget, None
    c.search.flops_fraction = c.search.params_fraction = None
    c.search.seed, c.finetune.seed = cfg.search.seed + seed, cfg.finetune.seed + seed
    return c


def _read_json(path: Path, fix: str) -> dict:
    """A point's record or summary; a truncated or hand-edited file is a user error naming it."""
    rec = read_json(path, "curve", "the point's record", fix)
    if not isinstance(rec, dict):
        raise UserError("curve", f"'{path}' is not a JSON object", fix)
    return rec


def _work_s(summary: dict) -> float:
    """A point's cost in seconds (its summary's ``work_s``; NaN when unknown: a rerun of stages whose time was not
    recorded, or a summary older than ``work_s`` that reused any stage)."""
    if "work_s" in summary:
        return float("nan") if summary["work_s"] is None else float(summary["work_s"])
    reused = any(v == "cached" for v in summary.get("timings", {}).values())
    return float("nan") if reused or "wall_s" not in summary else float(summary["wall_s"])


def _outcome(base: RunDir, rd: RunDir) -> Optional[dict]:
    path = base.curve_outcome(rd.root.name)
    if not path.is_file():
        return None
    rec = _read_json(path, "delete it and run that point again (`vitrim curve CONFIG --point K`)")
    return rec if rec.get("status") != "done" or rd.summary.is_file() else None


def continue_from(base: RunDir, points: list[CurvePoint], p: CurvePoint,
                  log: Callable[[str], None] = print) -> Optional[CurvePoint]:
    """The point a progressive point ``p`` continues from: the nearest point above it in its chain that reached its
    budget (one whose budget was unreachable is passed over); None for an independent point, or when none did.
    A point above it that has not finished is a UserError naming it."""
    j = p.after
    while j is not None:
        q = points[j]
        rd = point_dir(base, points, q)
        rec = _outcome(base, rd)
        if rec is None:
            raise UserError("curve", f"point {p.index} ({p.label()}) continues from point {j} ({q.label()}), which "
                            f"has not finished (no outcome for {rd.root})",
                            f"run `--point {j}` first (in a job array: make point {p.index} depend on it)")
        if rec["status"] == "done":
            return q
        log(f"[curve] point {j} ({q.label()}) did not reach its budget: point {p.index} looks further up its chain")
        j = q.after
    return None


# --continue-set: the search keys a continued point may change, its recipe only (the strategy, budget, seed, floors,
# alignment and token grid are the curve's: they name the point or key the shared latency table)
CONTINUE_SEARCH_KEYS = ("steps", "kd_iters", "saliency_batches", "lr", "eta", "step_epochs", "refill",
                        "measured_tolerance", "measured_rounds", "mask_iters", "mask_lr", "slim_l1", "dual_lr",
                        "merge_scoring", "merge_adapt_iters")


@dataclass(frozen=True)
class Continued:
    """``--continue-set``: the recipe of the points that continue from another (:func:`continue_config`)."""

    sets: tuple[str, ...]  # as given, recorded in each such point's outcome and in curve.md
    keys: dict  # {(section, key): value}: the keys it sets, as the config parsed them

    def apply(self, cfg: RunConfig) -> RunConfig:
        c = copy.deepcopy(cfg)
        for (section, key), v in self.keys.items():
            setattr(getattr(c, section), key, copy.deepcopy(v))
        return c


def continue_config(path, sets: list[str], continue_sets: list[str]) -> Optional[Continued]:
    """The recipe of the points that continue from another (``--continue-set``, applied after ``--set``); None when
    there is none. Checked before any point runs: a key outside finetune.* and the search's recipe keys, or a bad
    value, is a UserError naming it."""
    from vitrim.pipeline.core.config import load_config

    fix = (f"use KEY=VALUE with a finetune.* key (not seed) or one of search.{', search.'.join(CONTINUE_SEARCH_KEYS)}, "
           "e.g. --continue-set finetune.epochs=1")
    keys = []
    for item in continue_sets:
        section, _, key = item.partition("=")[0].strip().partition(".")
        if "=" not in item or not (section == "finetune" and key and key != "seed"
                                   or section == "search" and key in CONTINUE_SEARCH_KEYS):
            raise UserError("curve", f"--continue-set '{item}': a continued point may change only its recipe "
                            "(the strategy, budget, seed, floors and token grid are the curve's)", fix)
        keys.append((section, key))
    if not continue_sets:
        return None
    try:
        full = load_config(path, [*sets, *continue_sets])
    except UserError as e:
        raise UserError("curve", f"--continue-set {' '.join(continue_sets)}: {e.what}", e.fix or fix) from None
    return Continued(tuple(continue_sets), {(sec, k): getattr(getattr(full, sec), k) for sec, k in keys})


def run_point(cfg: RunConfig, points: list[CurvePoint], k: int, log: Callable[[str], None] = print,
              cont: Optional[Continued] = None) -> dict:
    """Run point ``k`` (``vitrim run`` into its directory) and record its outcome; returns that record.

    A progressive point needs the points above it finished (exit 2 naming one otherwise) and continues from the
    nearest that reached its budget (:func:`continue_from`); a budget its
    strategy cannot reach is recorded as unreachable, not raised (one such point must not sink the curve). ``cont``
    (:func:`continue_config`): the recipe laid over ``cfg`` for a point that continues from another.
    """
    from vitrim.pipeline.stages.run import run_pipeline

    if not 0 <= k < len(points):
        raise UserError("curve", f"--point {k}: this curve has points 0..{len(points) - 1}",
                        "list them with `vitrim curve CONFIG --budgets ... --list` (the same options)")
    base = RunDir(cfg.out_dir)
    p = points[k]
    rd = point_dir(base, points, p)
    prev = continue_from(base, points, p, log)
    recipe = cont if cont is not None and prev is not None else None  # --continue-set: continued points only
    c = curve_point(recipe.apply(cfg) if recipe else cfg, p.method, p.budget, p.seed)
    c.out_dir, c.name = str(rd.root), f"{cfg.name}/{p.method}@{p.budget:g}" + (f"/s{p.seed}" if p.seed else "")
    start = ""
    if prev is not None:
        c.search.start_from, c.search.start_weights = str(point_dir(base, points, prev).root), CURVES[p.mode][0]
        start = f", continuing from point {prev.index} ({prev.label()})" + (
            f" with --continue-set {' '.join(recipe.sets)}" if recipe else "")
    elif p.after is not None:
        log(f"[curve] no point above point {k} in its chain reached its budget: it starts from the teacher")
    outcome = base.curve_outcome(rd.root.name)
    outcome.unlink(missing_ok=True)
    log(f"[curve] point {k}/{len(points) - 1}: {p.label()}{start} -> {rd.root}")
    rec = {"index": k, "method": p.method, "budget": p.budget, "seed": p.seed, "dir": rd.root.name,
           "start_from": c.search.start_from and Path(c.search.start_from).name}
    if recipe:
        rec["continue_set"] = list(recipe.sets)
    try:
        run_pipeline(c, log=log)
        rec["status"] = "done"
    except UnreachableBudget as e:
        log(f"[curve] skipped {p.label()}: {e}")
        rec.update(status="unreachable", reason=str(e))
    atomic_write_json(outcome, rec)
    return rec


def retime(cfg: RunConfig, teacher: Path, engines: list[Path], log: Callable[[str], None] = print):
    """Time the teacher's release and every point's release round-robin in one session.

    Returns (timings: the teacher's then each point's, ratios: each point's latency over the teacher visits
    around it). Every release's manifest is verified first, and every one must be for the teacher's target.
    """
    from vitrim.export.compare import Release, check_same_target
    from vitrim.export.runners import interleaved, time_ratio

    ref = Release.load(teacher, "teacher")
    rels = [Release.load(e, "curve point") for e in engines]
    for r in rels:
        check_same_target(ref, r)
    p = cfg.profile
    rounds, repeats = max(12, p.rounds), max(60, p.repeats)
    log(f"[curve] re-timing the teacher and {len(rels)} point engines in one round-robin session "
        f"({rounds} rounds, batch {ref.signature.batch})")
    with interleaved([ref.timing_runner(), *[r.timing_runner() for r in rels]]) as runners:
        timings, ratios = time_ratio(runners, ref.signature.batch, repeats, rounds, p.warmup)
    return timings, ratios


def collect_curve(cfg: RunConfig, points: list[CurvePoint], log: Callable[[str], None] = print) -> list[dict]:
    """Re-time every finished point with the teacher in one session and write the CSV, the plot and the report.

    A point without an outcome is a UserError naming each (index, label, directory); points whose budget was
    unreachable are left out and named in the report. A point in several series (the head of the chains) is timed
    once and has a row in each.
    """
    from vitrim.profiling.curve import write_curve, write_curve_report

    base = RunDir(cfg.out_dir)
    done, skipped, missing = [], [], []
    for p in points:
        rd = point_dir(base, points, p)
        rec = _outcome(base, rd)
        if rec is None:
            missing.append(f"{p.index} ({p.label()}, {rd.root})")
        elif rec["status"] == "done":
            done.append((p, rd, rec))
        else:
            skipped.append((p, rec.get("reason", "")))
    if missing:
        raise UserError("curve", f"{len(missing)} of {len(points)} points have not finished: point "
                        + "; ".join(missing), "run each with `vitrim curve CONFIG --point K` and the same options, "
                        "then --collect again (points run with other --curves: pass the same --curves; an older "
                        "curve's independent points: --curves independent)")
    if not done:
        raise UserError("curve", "no point of the curve reached its budget", "raise the budgets")
    summaries = [_read_json(rd.summary, "run that point again (`vitrim curve CONFIG --point K`)") for _, rd, _ in done]
    teachers = {(s["teacher"]["params"], s["teacher"]["top1"]) for s in summaries}
    if len(teachers) > 1:  # one teacher engine stands for all: points of another teacher or test set do not mix
        raise UserError("curve", f"the points were run with different teachers or test sets (teacher params, "
                        f"test top-1: {sorted(teachers)})", "run every point with the same config and cache_dir")
    timings, ratios = retime(cfg, done[0][1].teacher_dir.root, [rd.root for _, rd, _ in done], log)
    t = summaries[0]["teacher"]
    rows = [{"method": "teacher", "budget": 1.0, "seed": "", "predicted_ms": t["predicted_ms"],
             "run_measured_ms": t["measured_ms"], "run_speedup": 1.0, "session_ms": timings[0].median_ms,
             "session_p90_ms": timings[0].p90_ms, "session_speedup": 1.0, "top1": t["top1"], "delta_top1": 0.0,
             "params": t["params"], "macs": t["macs"], "run_dir": done[0][1].teacher_dir.root.relative_to(base.root),
             "start_from": "", "wall_s": ""}]
    for (p, rd, rec), s, tm, r in zip(done, summaries, timings[1:], ratios):
        st = s["student"]
        for name in p.names():
            rows.append({"method": name, "budget": p.budget, "seed": p.seed, "predicted_ms": st["predicted_ms"],
                         "run_measured_ms": st["measured_ms"], "run_speedup": s["speedup"],
                         "session_ms": tm.median_ms, "session_p90_ms": tm.p90_ms, "session_speedup": 1.0 / r,
                         "top1": st["top1"], "delta_top1": s["delta_top1"], "params": st["params"],
                         "macs": st["macs"], "run_dir": rd.root.name, "start_from": rec.get("start_from") or "",
                         "wall_s": _work_s(s)})
    recipes = sorted({" ".join(rec["continue_set"]) for _, _, rec in done if rec.get("continue_set")})
    title = f"{cfg.name}: latency vs test top-1 (one timing session)"
    csv_p, png_p = write_curve(rows, base.root, title)
    md = write_curve_report(rows, base.root, title, protocol=(
        f"the teacher and {len(done)} point engines re-timed round-robin in one session after every point had run "
        f"({max(12, cfg.profile.rounds)} rounds; each point visit over the teacher visits around it), "
        f"{cfg.target.backend} {cfg.target.precision}, batch {cfg.target.batch}"
        + "".join(f"; points that continued from another ran with --continue-set {r}" for r in recipes)),
        skipped=[f"{p.label()}: {why}" for p, why in skipped],
        progressive=[(m, CURVES[m][1]) for m in dict.fromkeys(p.mode for p in points if p.mode)])
    log(f"[curve] wrote {csv_p}, {png_p} and {md}")
    return rows


def run_curve(cfg: RunConfig, budgets: list[float], baselines: list[str], seeds: int = 1,
              curves: Sequence[str] = DEFAULT_CURVES, log: Callable[[str], None] = print,
              cont: Optional[Continued] = None) -> list[dict]:
    """Run every point of the curve (sharing the teacher and the LUT), then :func:`collect_curve`."""
    from vitrim.pipeline.stages.cache import prepare_cache

    prepare_cache(cfg, lut=True, log=log)  # once: every point shares the teacher and table (a temporary cache too)
    points = curve_points(cfg, budgets, baselines, seeds, curves)
    for p in points:
        run_point(cfg, points, p.index, log, cont=cont)
    return collect_curve(cfg, points, log)
